"""The target of a load test: what it serves (model id, native size), asked once before the load starts."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any

from loadtest.settings import Settings


class TargetError(RuntimeError):
    """The target cannot be used (unreachable, no model, probe failed)."""


def _http_json(url: str, api_key: str | None, body: dict | None, timeout_s: float) -> Any:
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise TargetError(f"{req.get_method()} {url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TargetError(f"{req.get_method()} {url}: {exc}") from None


def discover(host: str, settings: Settings) -> Settings:
    """Fill in the model id (first of /v1/models) and the native size (one float probe)."""
    base = host.rstrip("/")
    model = settings.model
    if model is None:
        listing = _http_json(base + "/v1/models", settings.api_key, None, 30)
        ids = [m.get("id") for m in listing.get("data", []) if m.get("id")]
        if not ids:
            raise TargetError(f"GET {base}/v1/models lists no model; pass --model")
        model = ids[0]
    expected = settings.expected_dim
    if expected is None:
        answer = _http_json(
            base + "/v1/embeddings",
            settings.api_key,
            {"model": model, "input": "load test probe", "encoding_format": "float"},
            settings.timeout_s,
        )
        try:
            expected = len(answer["data"][0]["embedding"])
        except (KeyError, IndexError, TypeError):
            raise TargetError(f"probe answer has no embedding: {str(answer)[:300]}") from None
    return replace(settings, model=model, expected_dim=expected)
