#!/usr/bin/env python
"""Copy cluster/config.yaml into the KubeRay manifest's serveConfigV2 (with `host: 0.0.0.0`).

python cluster/sync_kuberay.py          # rewrite cluster/kuberay-rayservice.yaml
python cluster/sync_kuberay.py --check  # exit 1 if it is out of date (what the tests check)
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.yaml"
MANIFEST = HERE / "kuberay-rayservice.yaml"
LOCAL_HOST = "  host: 127.0.0.1\n"
POD_HOST = "  host: 0.0.0.0                # pods are reached from outside themselves (the only change)\n"
START, END = "  serveConfigV2: |\n", "  rayClusterConfig:\n"


def serve_config_for_pods(config_text: str) -> str:
    if config_text.count(LOCAL_HOST) != 1:
        raise ValueError(f"expected exactly one line {LOCAL_HOST.strip()!r} in {CONFIG.name}")
    return config_text.replace(LOCAL_HOST, POD_HOST)


def synced_manifest(manifest_text: str, config_text: str) -> str:
    head, rest = manifest_text.split(START, 1)
    _, tail = rest.split(END, 1)
    block = "".join(
        ("    " + line if line.strip() else "\n")
        for line in serve_config_for_pods(config_text).splitlines(keepends=True)
    )
    return head + START + block + END + tail


def main(argv: list[str]) -> int:
    current = MANIFEST.read_text()
    wanted = synced_manifest(current, CONFIG.read_text())
    if "--check" in argv:
        if current != wanted:
            print(f"{MANIFEST.name} is out of date with {CONFIG.name}: run python cluster/sync_kuberay.py")
            return 1
        return 0
    if current != wanted:
        MANIFEST.write_text(wanted)
        print(f"updated {MANIFEST.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
