"""The encoder core: token ids → embeddings, knowing nothing of Ray or HTTP.

    from serve_app import Encoder
    enc = Encoder.from_pretrained("HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2")
    enc.encode(["what is ray serve?"], instruction="Given a query, retrieve documents that answer the query")

The service's replicas, the corpus job and notebooks all use this class, so the
same text gives the same vector everywhere.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .backbone import load_backbone
from .batching import pad_batch, plan_batches
from .checkpoint import ModelFiles, read_model_files
from .pooling import l2_normalize, pool, truncate_dimensions
from .tokenization import TextTokenizer

log = logging.getLogger(__name__)

#: Default token budget per forward pass (padded length × rows).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 512, "cuda": 16384}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what the weights ship in), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass computed; feeds metrics and benchmarks."""

    rows: int
    tokens: int  # real tokens
    padded_tokens: int  # tokens computed, padding included
    seconds: float


class Encoder:
    """Embeds texts or token ids with one model on one device."""

    def __init__(
        self,
        files: ModelFiles,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int | None = None,
    ):
        self.files = files
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS[device.type]
        self.dimensions = files.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        max_input_tokens: int | None = None,
        max_batch_tokens: int | None = None,
        trust_remote_code: bool = False,
    ) -> "Encoder":
        """Load a hub id or a local directory (sentence-transformers or bare transformers layout)."""
        started = time.perf_counter()
        files = read_model_files(name_or_path)
        device = torch.device(device) if device is not None else default_device()
        torch_dtype = parse_dtype(dtype, device)
        model = load_backbone(files, device, torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = TextTokenizer(files, max_input_tokens)
        if files.is_standin:
            log.warning("%s is a stand-in checkpoint with RANDOM weights, not the real model", files.path)
        log.info(
            "model loaded: source=%s device=%s dtype=%s pooling=%s normalize=%s max_input_tokens=%d seconds=%.2f",
            files.path, device, str(torch_dtype).removeprefix("torch."), files.pooling, files.normalize,
            tokenizer.max_input_tokens, time.perf_counter() - started,
        )
        return cls(files, model, tokenizer, device, torch_dtype, max_batch_tokens)

    # --- the public API ----------------------------------------------------------------

    def encode(
        self,
        texts: str | Sequence[str],
        instruction: str | None = None,
        dimensions: int | None = None,
        *,
        prompt_name: str | None = None,
        truncate: bool = False,
    ) -> np.ndarray:
        """Embed texts: float32 array [n, dimensions or native size].

        ``instruction`` formats each text as KaLM's query (``Instruct: {instruction} \\n
        Query: {text}``); ``prompt_name`` picks a prompt the model ships (``query``,
        ``document``). Inputs over the token limit raise unless ``truncate`` is set.
        """
        if isinstance(texts, str):
            texts = [texts]
        prompt = self.tokenizer.prompt_for(instruction, prompt_name)
        tokenized = self.tokenizer.encode_texts(texts, prompt=prompt, truncate=truncate)
        return truncate_dimensions(self.embed_token_ids([t.ids for t in tokenized]), dimensions)

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed already tokenised inputs at native size, batched under the token budget."""
        out = np.empty((len(token_ids), self.dimensions), dtype=np.float32)
        lengths = [len(ids) for ids in token_ids]
        for batch in plan_batches(lengths, self.max_batch_tokens):
            vectors, _ = self.forward_batch([token_ids[i] for i in batch])
            out[batch] = vectors
        return out

    # --- one forward pass --------------------------------------------------------------

    @torch.inference_mode()
    def forward_batch(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, BatchStats]:
        """One forward pass over ``token_ids`` as a single padded batch."""
        started = time.perf_counter()
        input_ids, attention_mask = pad_batch(token_ids, self.tokenizer.pad_token_id)
        input_ids = input_ids.to(self.device, non_blocking=True)
        attention_mask = attention_mask.to(self.device, non_blocking=True)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)
        vectors = pool(hidden, attention_mask, self.files.pooling).cpu().numpy()
        if self.files.normalize:
            vectors = l2_normalize(vectors)
        stats = BatchStats(
            rows=len(token_ids),
            tokens=int(attention_mask.sum()),
            padded_tokens=int(attention_mask.numel()),
            seconds=time.perf_counter() - started,
        )
        return vectors.astype(np.float32, copy=False), stats

    def warm_up(self) -> float:
        """Run one small batch so the first real request does not pay for lazy init."""
        started = time.perf_counter()
        self.forward_batch([[self.tokenizer.pad_token_id] * 8] * 2)
        seconds = time.perf_counter() - started
        log.info("warm-up done in %.2fs", seconds)
        return seconds
