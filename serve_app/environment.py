"""Every environment variable the package reads, with its default: the one place they are read.

| variable | default | read by |
|---|---|---|
| ``KALM_MODEL`` | the hub id ``HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2`` | ``ServiceConfig.model``, the corpus job |
| ``KALM_API_KEYS`` | unset: no authentication | the ingress (comma-separated keys) |
| ``KALM_DTYPE`` | unset: ``dtype: auto`` decides | ``core.device.parse_dtype`` when the dtype is ``auto`` |
| ``KALM_CORPUS_DEBUG`` | unset | the corpus job logs at DEBUG when set |
| ``RAY_ADDRESS`` | unset: the corpus job starts a local Ray | the corpus job (Ray's own variable: the cluster to join) |
"""

from __future__ import annotations

import os

DEFAULT_MODEL = "HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2"


def model() -> str:
    """``$KALM_MODEL``, else the hub id of KaLM-Embedding v2."""
    return os.environ.get("KALM_MODEL") or DEFAULT_MODEL


def api_keys() -> list[str]:
    """``$KALM_API_KEYS`` split on commas; empty means the service asks for no key."""
    return [k.strip() for k in os.environ.get("KALM_API_KEYS", "").split(",") if k.strip()]


def dtype_override() -> str | None:
    """``$KALM_DTYPE``: the dtype ``auto`` stands for, when set."""
    return os.environ.get("KALM_DTYPE") or None


def corpus_debug() -> bool:
    return bool(os.environ.get("KALM_CORPUS_DEBUG"))


def ray_address() -> str | None:
    """``$RAY_ADDRESS``: the Ray cluster the corpus job joins; unset, it starts a local Ray."""
    return os.environ.get("RAY_ADDRESS") or None
