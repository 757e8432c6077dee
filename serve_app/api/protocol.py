"""The OpenAI embeddings protocol: request model, its one validation function, responses.

``validate_request`` turns a parsed body into token ids the encoder replicas can run,
deciding every limit before any model work is done.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from ..config import ServiceConfig
from ..core.tokenization import TextTokenizer
from ..errors import InvalidRequestError, ModelNotFoundError

Priority = Literal["interactive", "bulk"]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. Unknown fields are rejected, as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    # Extensions (clients send them through extra_body)
    instruction: StrictStr | None = None
    input_type: Literal["query", "document"] | None = None
    truncate: StrictBool = False
    priority: Priority | None = None


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: what to embed and how to answer."""

    token_ids: list[list[int]]
    n_tokens: int
    dimensions: int | None
    encoding_format: str
    priority: Priority


def validate_request(
    req: EmbeddingRequest,
    config: ServiceConfig,
    tokenizer: TextTokenizer,
    native_dimensions: int,
) -> PreparedRequest:
    """Check everything about ``req`` and tokenise it; raises the matching error."""
    if req.model not in config.accepted_model_ids:
        raise ModelNotFoundError(f"The model '{req.model}' does not exist; this service serves '{config.model_id}'")

    # One string or one token list is a single input.
    single = isinstance(req.input, str) or (bool(req.input) and isinstance(req.input[0], int))
    inputs = [req.input] if single else req.input
    if not inputs:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(inputs) > config.max_inputs_per_request:
        raise InvalidRequestError(
            f"input has {len(inputs)} items; at most {config.max_inputs_per_request} are allowed per request",
            param="input",
        )
    if req.dimensions is not None and not 1 <= req.dimensions <= native_dimensions:
        raise InvalidRequestError(
            f"dimensions must be between 1 and {native_dimensions}, got {req.dimensions}", param="dimensions"
        )
    if req.instruction is not None and req.input_type is not None:
        raise InvalidRequestError("set either instruction or input_type, not both", param="instruction")
    if req.instruction is not None and not req.instruction.strip():
        raise InvalidRequestError("instruction must not be empty", param="instruction")

    if isinstance(inputs[0], str):
        prompt = tokenizer.request_prompt(req.instruction, req.input_type, config.default_query_instruction)
        # pydantic validated ``input`` as one shape of its union: the first item says which
        tokenized = tokenizer.encode_texts(cast("list[str]", inputs), prompt=prompt, truncate=req.truncate)
    else:
        if req.instruction is not None or req.input_type == "query":
            raise InvalidRequestError("instructions apply to text inputs, not token ids", param="instruction")
        tokenized = tokenizer.check_token_ids(cast("list[list[int]]", inputs), truncate=req.truncate)

    token_ids = [t.ids for t in tokenized]
    n_tokens = sum(len(ids) for ids in token_ids)
    if n_tokens > config.max_request_tokens:
        raise InvalidRequestError(
            f"the request has {n_tokens} tokens in total; at most {config.max_request_tokens} are allowed "
            f"per request: split it",
            param="input",
        )
    priority = req.priority or ("interactive" if n_tokens <= config.interactive_max_tokens else "bulk")
    return PreparedRequest(token_ids, n_tokens, req.dimensions, req.encoding_format, priority)


def render_embeddings(vectors: np.ndarray, encoding_format: str, model_id: str, n_tokens: int) -> bytes:
    """The response body; base64 is little-endian float32 bytes, as the openai client decodes it."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode("ascii")}
            for i, v in enumerate(vectors)
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    body = {
        "object": "list",
        "model": model_id,
        "data": data,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def render_models(model_id: str, created: int, owned_by: str = "kalm-serve") -> bytes:
    return orjson.dumps(
        {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": owned_by, "created": created}]}
    )
