"""Where and in what precision the model runs: the one place device, dtype and CPU threads are decided."""

from __future__ import annotations

import torch

from .. import environment


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``auto`` (or None): CUDA when this process sees a GPU, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_cpu_threads(n: int) -> None:
    """Run torch on ``n`` threads: Ray exports OMP_NUM_THREADS for a reservation, torch must really use that many."""
    torch.set_num_threads(max(1, n))


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls in hardware."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what the weights ship in) and on CPUs with bf16 in hardware (2.5x the
    fp32 speed on the project's test machine, an AMD EPYC with AVX512-BF16); fp32 on other
    CPUs, where bf16 is emulated and slow."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16``, ``float32``, ...: as logs, summaries and ``--dtype`` write it."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` (or None): ``$KALM_DTYPE`` if set, else :func:`default_dtype`."""
    if dtype is None or dtype == "auto":
        dtype = environment.dtype_override() or "auto"
    if dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. To a GPU through pinned memory, asynchronously: the copy
    overlaps the GPU's work and the host goes on (a copy from pageable memory waits for it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
