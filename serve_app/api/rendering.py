"""Response bodies of the OpenAI routes: embeddings (float or base64) and the model list."""

from __future__ import annotations

import binascii

import numpy as np
import orjson


def render_embeddings(vectors: np.ndarray, encoding_format: str, model_id: str, n_tokens: int) -> bytes:
    """The response body; base64 is little-endian float32 bytes, as the openai client decodes it.

    Quantised vectors (int8, uint8, packed bits: core/quantization.py) are integers in JSON, and
    their raw bytes in base64.
    """
    vectors = np.ascontiguousarray(vectors, dtype="<f4" if vectors.dtype.kind == "f" else None)
    if encoding_format == "base64":
        return _base64_body(vectors, model_id, n_tokens)
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    body = {
        "object": "list",
        "model": model_id,
        "data": data,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _base64_body(vectors: np.ndarray, model_id: str, n_tokens: int) -> bytes:
    """The same JSON as orjson writes for the float answer's shape, written straight from the array's rows:
    base64 of each row's buffer, no per-row Python strings or dicts (base64 needs no JSON escaping)."""
    items = b",".join(
        b'{"object":"embedding","index":%d,"embedding":"%s"}' % (i, binascii.b2a_base64(row, newline=False))
        for i, row in enumerate(vectors)
    )
    usage = b'{"prompt_tokens":%d,"total_tokens":%d}' % (n_tokens, n_tokens)
    return b'{"object":"list","model":%s,"data":[%s],"usage":%s}' % (orjson.dumps(model_id), items, usage)


def render_models(model_ids: list[str], created: int, owned_by: str = "kalm-serve") -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"id": m, "object": "model", "owned_by": owned_by, "created": created} for m in model_ids],
        }
    )
