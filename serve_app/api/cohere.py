"""Cohere's ``POST /v2/embed``: its request model, read into the OpenAI route's validation, and its answer.

A Cohere request is checked and tokenised by the same ``validate_and_tokenize`` as ``/v1/embeddings``
(limits, prompts, truncation), so both routes embed a text alike; only the names differ, and errors
name Cohere's fields. Errors keep the API's one shape (OpenAI's, ``api/http_errors.py``): the
``cohere`` client raises its ``BadRequestError`` on any 400 body.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from typing import Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from ..config import ServiceConfig
from ..core.quantization import CalibrationRanges, check_embedding_types
from ..core.tokenization import TextTokenizer
from ..core.vectors import check_dimensions
from ..errors import InvalidRequestError
from .protocol import EmbeddingRequest, TokenizedRequest, load_json_object, validate_and_tokenize

CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]

#: Cohere's input types as this model's prompts: queries get the model's query instruction; the
#: symmetric tasks (classification, clustering) compare texts of one kind, embedded as documents
#: are (no instruction). A task instruction of one's own: /v1/embeddings' ``instruction``.
INPUT_TYPES: dict[str, Literal["query", "document"]] = {
    "search_query": "query",
    "search_document": "document",
    "classification": "document",
    "clustering": "document",
}

#: Our field names (and the words errors use) -> Cohere's.
_FIELD_NAMES = {"input": "texts", "dimensions": "output_dimension"}


class CohereEmbedRequest(BaseModel):
    """POST /v2/embed, text only. Unknown fields are rejected; ``images`` / ``inputs`` are a 400."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    texts: list[StrictStr]
    input_type: Literal["search_query", "search_document", "classification", "clustering"]
    embedding_types: list[CohereEmbeddingType] = ["float"]
    output_dimension: StrictInt | None = None
    #: Cohere's default: cut over-long texts at the end. START would need tokenising whole texts
    #: from their end: not offered (400), rather than cutting where the client did not ask.
    truncate: Literal["NONE", "END"] = "END"


def parse_cohere_embed(body: bytes | bytearray, config: ServiceConfig) -> CohereEmbedRequest:
    """The request in ``body``, with what Cohere defines and this service does not offer refused."""
    parsed = load_json_object(body, config)
    for field in ("images", "inputs"):
        if parsed.get(field) is not None:
            raise InvalidRequestError(f"this service embeds text only: send texts, not {field}", param=field)
        parsed.pop(field, None)
    if parsed.get("truncate") == "START":
        raise InvalidRequestError(
            "truncate START is not offered; use END (cut the end of over-long texts) or NONE (a 400 for them)",
            param="truncate",
        )
    return CohereEmbedRequest.model_validate(parsed)


def tokenize_cohere_embed(
    req: CohereEmbedRequest,
    config: ServiceConfig,
    tokenizer: TextTokenizer,
    native_dimensions: int,
    calibration: CalibrationRanges | None,
) -> TokenizedRequest:
    """``req`` validated and tokenised for its model exactly as ``/v1/embeddings`` does it."""
    types = tuple(dict.fromkeys(req.embedding_types))  # each once, in the order asked
    if not types:
        raise InvalidRequestError("embedding_types must not be empty", param="embedding_types")
    openai_request = EmbeddingRequest.model_construct(
        model=req.model,
        input=req.texts,
        encoding_format="float",
        dimensions=req.output_dimension,
        instruction=None,
        input_type=INPUT_TYPES[req.input_type],
        truncate=req.truncate == "END",
        priority=None,
        embedding_type="float",
    )
    try:
        check_dimensions(req.output_dimension, native_dimensions)
        check_embedding_types(
            types, req.output_dimension or native_dimensions, calibration, "embedding_types", "output_dimension"
        )
        tokenized = validate_and_tokenize(openai_request, config, tokenizer, native_dimensions, calibration)
    except InvalidRequestError as exc:
        _in_cohere_terms(exc)
        raise
    return replace(tokenized, embedding_types=types)


def _in_cohere_terms(exc: InvalidRequestError) -> None:
    """Name Cohere's fields in an error raised by the shared validation."""
    exc.param = _FIELD_NAMES.get(exc.param or "", exc.param)
    message = re.sub(r"^(input|dimensions)\b", lambda m: _FIELD_NAMES[m.group(1)], exc.message)
    exc.message = message.replace("set truncate=true", "set truncate=END")
    exc.args = (exc.message,)


def render_cohere_embed(typed: dict[str, np.ndarray], texts: list[str], n_tokens: int) -> bytes:
    """Cohere's ``embeddings_by_type`` answer: one list of vectors per type asked, in input order."""
    body = {
        "id": str(uuid.uuid4()),
        "response_type": "embeddings_by_type",
        "embeddings": typed,
        "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": n_tokens}},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
