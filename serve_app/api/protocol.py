"""The OpenAI embeddings request: its model, parsing, and the one function that validates and tokenises it.

``parse_request`` turns a JSON body into an ``EmbeddingRequest`` (sizes counted before anything
is validated item by item), ``validate_and_tokenize`` turns that into token ids the encoder
replicas can run, deciding every limit before any model work is done and tokenising no more text
than the limits need (``TextTokenizer.encode_within_limits``; docs/limits.md). Answers are
rendered in ``api/rendering.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

import orjson
from pydantic import BaseModel, ConfigDict, PlainValidator, StrictBool, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from ..config import ServiceConfig
from ..core.quantization import CalibrationRanges, check_embedding_types
from ..core.tokenization import TextTokenizer, check_request_tokens
from ..core.vectors import check_dimensions
from ..errors import InvalidRequestError, ModelNotFoundError
from .token_ids import read_token_id_inputs

Priority = Literal["interactive", "bulk"]

INPUT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _input_error(message: str) -> PydanticCustomError:
    return PydanticCustomError("input", message + f"; input must be {INPUT_SHAPES}")


def read_input(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """``input`` as one of its four shapes, or an error naming the first item that breaks it."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _input_error(f"input is {_kind(value)}")
    if not value:
        return value  # "must not be empty" comes from validate_and_tokenize, with the other limits
    first = value[0]
    if isinstance(first, str):
        bad = next((i for i, x in enumerate(value) if type(x) is not str), None)
        if bad is not None:
            raise _input_error(f"input mixes strings with other values: input[{bad}] is {_kind(value[bad])}")
        return value
    if isinstance(first, (int, float)):  # a token-id list, or meant to be one (1.5, true)
        _check_token_ids(value, "input")
        return value
    if isinstance(first, list):
        for i, ids in enumerate(value):
            if not isinstance(ids, list):
                raise _input_error(f"input mixes token-id lists with other values: input[{i}] is {_kind(ids)}")
            _check_token_ids(ids, f"input[{i}]")
        return value
    raise _input_error(f"input[0] is {_kind(first)}")


def _check_token_ids(ids: list, where: str) -> None:
    bad = next((i for i, x in enumerate(ids) if type(x) is not int), None)
    if bad is not None:
        raise _input_error(f"{where}[{bad}] is {_kind(ids[bad])}, not a token id (token ids are whole numbers)")


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. Unknown fields are rejected, as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    input: Annotated[StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]], PlainValidator(read_input)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    # Extensions (clients send them through extra_body)
    instruction: StrictStr | None = None
    input_type: Literal["query", "document"] | None = None
    truncate: StrictBool = False
    priority: Priority | None = None
    embedding_type: Literal["float", "int8", "uint8", "binary", "ubinary"] = "float"


#: Bodies larger than this are checked for a flood of numbers before they are parsed.
NUMBER_CHECK_BYTES = 1024 * 1024
#: What a JSON array of numbers is made of.
NUMBER_BYTES = b"0123456789,-+.eE \t\r\n[]"


def parse_request(body: bytes | bytearray, config: ServiceConfig, max_input_tokens: int) -> EmbeddingRequest:
    """The request in ``body``; token ids are counted before they are validated one by one."""
    parsed = load_json_object(body, config)
    value = parsed.get("input")
    if isinstance(value, list) and value and isinstance(value[0], list):
        lists = value if all(isinstance(ids, list) for ids in value) else []
        truncate = parsed.get("truncate") is True
        n_tokens = sum(min(len(ids), max_input_tokens) if truncate else len(ids) for ids in lists)
        check_request_tokens(n_tokens, config.max_request_tokens)
    elif isinstance(value, list) and value and type(value[0]) is int:
        check_request_tokens(len(value), config.max_request_tokens)
    return EmbeddingRequest.model_validate(parsed)


def load_json_object(body: bytes | bytearray, config: ServiceConfig) -> dict[str, Any]:
    """The JSON object in ``body`` (every embeddings route's first step).

    A large body made almost only of numbers is counted before it is even parsed: parsing
    32 MiB of token ids makes ~5 M Python ints (~180 MB), only to refuse them. Numbers written
    in a text count too: Qwen2's tokenizer makes every digit a token.
    """
    if len(body) > NUMBER_CHECK_BYTES:
        commas = body.count(b",")
        if commas > config.max_request_tokens + config.max_inputs_per_request and (
            len(body.translate(None, NUMBER_BYTES)) < commas
        ):
            raise InvalidRequestError(
                f"the request holds about {commas} numbers (counted before parsing; each is a token, as a token "
                f"id or as digits in a text); at most {config.max_request_tokens} tokens are allowed per request: "
                f"split it",
                param="input",
            )
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError(f"request body must be a JSON object, got {_kind(parsed)}")
    return parsed


@dataclass(frozen=True)
class TokenizedRequest:
    """A validated request, tokenised: what to embed and how to answer."""

    token_ids: list[list[int]]
    n_tokens: int
    dimensions: int | None
    encoding_format: str
    priority: Priority
    #: Each type the answer holds (core/quantization.py), checked against the dimensions and ranges.
    embedding_types: tuple[str, ...] = ("float",)


def validate_and_tokenize(
    req: EmbeddingRequest,
    config: ServiceConfig,
    tokenizer: TextTokenizer,
    native_dimensions: int,
    calibration: CalibrationRanges | None = None,
) -> TokenizedRequest:
    """Check everything about ``req`` and tokenise it; raises the matching error.

    ``calibration``: the service's ranges for ``int8`` / ``uint8`` (none: those are a 400).
    """
    if req.model not in config.accepted_model_ids:
        raise ModelNotFoundError(f"The model '{req.model}' does not exist; this service serves '{config.model_id}'")

    # One string or one token list is a single input.
    single = isinstance(req.input, str) or (bool(req.input) and isinstance(req.input[0], int))
    given: list = [req.input] if single else list(req.input)
    inputs = read_token_id_inputs(given, config.token_id_inputs)
    if not inputs:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(inputs) > config.max_inputs_per_request:
        raise InvalidRequestError(
            f"input has {len(inputs)} items; at most {config.max_inputs_per_request} are allowed per request",
            param="input",
        )
    check_dimensions(req.dimensions, native_dimensions)
    check_embedding_types(
        [req.embedding_type], req.dimensions or native_dimensions, calibration, "embedding_type", "dimensions"
    )
    if req.instruction is not None and req.input_type is not None:
        raise InvalidRequestError("set either instruction or input_type, not both", param="instruction")
    if req.instruction is not None and not req.instruction.strip():
        raise InvalidRequestError("instruction must not be empty", param="instruction")

    if isinstance(inputs[0], str):
        prompt = tokenizer.request_prompt(req.instruction, req.input_type, config.default_query_instruction)
        # pydantic validated ``input`` as one shape of its union: the first item says which
        texts = cast("list[str]", inputs)
        tokenized = tokenizer.encode_within_limits(texts, prompt, req.truncate, config.max_request_tokens)
    else:
        if req.instruction is not None or req.input_type == "query":
            raise InvalidRequestError("instructions apply to text inputs, not token ids", param="instruction")
        tokenized = tokenizer.check_token_ids(cast("list[list[int]]", inputs), truncate=req.truncate)

    token_ids = [t.ids for t in tokenized]
    n_tokens = sum(len(ids) for ids in token_ids)
    check_request_tokens(n_tokens, config.max_request_tokens)
    priority = req.priority or ("interactive" if n_tokens <= config.interactive_max_tokens else "bulk")
    return TokenizedRequest(token_ids, n_tokens, req.dimensions, req.encoding_format, priority, (req.embedding_type,))
