"""The OpenAI embeddings protocol: request model, its one validation function, responses.

``parse_request`` turns a JSON body into an ``EmbeddingRequest`` (sizes counted before anything
is validated item by item), ``validate_request`` turns that into token ids the encoder replicas
can run, deciding every limit before any model work is done and tokenising no more text than
the limits need (docs/limits.md).
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, PlainValidator, StrictBool, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from ..config import ServiceConfig
from ..core.tokenization import TextTokenizer, TokenizedInput
from ..core.vectors import check_dimensions
from ..errors import InputTooLongError, InvalidRequestError, ModelNotFoundError
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
        return value  # "must not be empty" comes from validate_request, with the other limits
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


#: Bodies larger than this are checked for a flood of numbers before they are parsed.
NUMBER_CHECK_BYTES = 1024 * 1024
#: What a JSON array of numbers is made of.
NUMBER_BYTES = b"0123456789,-+.eE \t\r\n[]"


def parse_request(body: bytes | bytearray, config: ServiceConfig, max_input_tokens: int) -> EmbeddingRequest:
    """The request in ``body``; token ids are counted before they are validated one by one.

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
    value = parsed.get("input")
    if isinstance(value, list) and value and isinstance(value[0], list):
        lists = value if all(isinstance(ids, list) for ids in value) else []
        truncate = parsed.get("truncate") is True
        _check_request_tokens(sum(min(len(ids), max_input_tokens) if truncate else len(ids) for ids in lists), config)
    elif isinstance(value, list) and value and type(value[0]) is int:
        _check_request_tokens(len(value), config)
    return EmbeddingRequest.model_validate(parsed)


def _check_request_tokens(n_tokens: int, config: ServiceConfig, more_than: bool = False) -> None:
    if n_tokens > config.max_request_tokens:
        raise InvalidRequestError(
            f"the request has {'more than ' if more_than else ''}{n_tokens} tokens in total; at most "
            f"{config.max_request_tokens} are allowed per request: split it",
            param="input",
        )


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
    if req.instruction is not None and req.input_type is not None:
        raise InvalidRequestError("set either instruction or input_type, not both", param="instruction")
    if req.instruction is not None and not req.instruction.strip():
        raise InvalidRequestError("instruction must not be empty", param="instruction")

    if isinstance(inputs[0], str):
        prompt = tokenizer.request_prompt(req.instruction, req.input_type, config.default_query_instruction)
        # pydantic validated ``input`` as one shape of its union: the first item says which
        tokenized = tokenize_texts(cast("list[str]", inputs), prompt, req.truncate, tokenizer, config)
    else:
        if req.instruction is not None or req.input_type == "query":
            raise InvalidRequestError("instructions apply to text inputs, not token ids", param="instruction")
        tokenized = tokenizer.check_token_ids(cast("list[list[int]]", inputs), truncate=req.truncate)

    token_ids = [t.ids for t in tokenized]
    n_tokens = sum(len(ids) for ids in token_ids)
    _check_request_tokens(n_tokens, config)
    priority = req.priority or ("interactive" if n_tokens <= config.interactive_max_tokens else "bulk")
    return PreparedRequest(token_ids, n_tokens, req.dimensions, req.encoding_format, priority)


# --- tokenising no more than the limits need ----------------------------------------------

#: Texts up to this many characters per token of the limit are tokenised whole; a longer one is
#: tokenised a prefix at a time (4x longer each time) until its tokens pass the limit or it ends.
#: Ordinary text has 1-8 characters per token, so most inputs are tokenised once.
FIRST_PREFIX_CHARS_PER_TOKEN = 4

#: Short texts are tokenised together in groups of about this many characters, so a request over
#: its token limit is refused after about that much extra work.
GROUP_CHARS = 256 * 1024

#: A prefix is cut before whitespace found in its last this-many characters, so the pieces of text
#: before the cut are tokenised exactly as in the whole text ...
CUT_SEARCH_CHARS = 256
#: ... and only its last pieces may differ: a prefix proves an input too long with this margin.
CUT_MARGIN_TOKENS = 2


@functools.lru_cache(maxsize=8)
def max_chars_per_token(tokenizer: TextTokenizer) -> int:
    """The most characters one token can stand for: its longest vocabulary entry.

    A byte-level BPE token of n bytes covers at most n characters (KaLM v2: 128, a run of spaces);
    added tokens are matched as their text. So a text longer than ``limit x this`` characters has
    more than ``limit`` tokens and is refused uncounted. (NFC normalisation can merge a letter and
    its combining marks into one character, which only makes such texts longer in tokens.)
    """
    return max(len(token) for token in tokenizer.tokenizer.get_vocab(with_added_tokens=True))


def tokenize_texts(
    texts: list[str], prompt: str, truncate: bool, tokenizer: TextTokenizer, config: ServiceConfig
) -> list[TokenizedInput]:
    """Tokenise ``prompt + text`` for each text, refusing over-long inputs and requests early.

    Characters first: a text that cannot fit is refused (or, with ``truncate``, cut to what can
    fit) before tokenising; then tokens: long texts a prefix at a time, and the request stops as
    soon as its running token count passes ``max_request_tokens``.
    """
    limit = tokenizer.max_input_tokens
    max_chars = limit * max_chars_per_token(tokenizer)
    for i, text in enumerate(texts):
        if not text:
            raise InvalidRequestError(f"input[{i}] is an empty string", param="input")
        if len(text) > max_chars and not truncate:
            raise InputTooLongError(
                i,
                f"{len(text)} characters (more than any {limit} tokens can hold: a token is at most "
                f"{max_chars_per_token(tokenizer)} characters)",
                limit,
            )
    texts = [text[:max_chars] for text in texts]
    n_chars = sum(len(text) for text in texts)
    if n_chars > config.max_request_tokens * max_chars_per_token(tokenizer):
        raise InvalidRequestError(
            f"the request has {n_chars} characters, more than its token limit can hold (a token is at most "
            f"{max_chars_per_token(tokenizer)} characters); at most {config.max_request_tokens} tokens are allowed "
            f"per request: split it",
            param="input",
        )

    out: list[TokenizedInput] = []
    n_tokens = 0
    first_prefix = limit * FIRST_PREFIX_CHARS_PER_TOKEN
    start = 0
    while start < len(texts):
        if len(texts[start]) > first_prefix:
            group = [_tokenize_long(start, texts[start], prompt, truncate, tokenizer, first_prefix)]
        else:
            end, chars = start, 0
            while end < len(texts) and len(texts[end]) <= first_prefix and chars < GROUP_CHARS:
                chars += len(texts[end])
                end += 1
            group = _encode(texts[start:end], start, prompt, truncate, tokenizer)
        out += group
        start += len(group)
        n_tokens += sum(len(t.ids) for t in group)
        _check_request_tokens(n_tokens, config, more_than=start < len(texts))
    return out


def _encode(
    texts: list[str], offset: int, prompt: str, truncate: bool, tokenizer: TextTokenizer
) -> list[TokenizedInput]:
    try:
        return tokenizer.encode_texts(texts, prompt=prompt, truncate=truncate)
    except InputTooLongError as exc:  # its index is into this group
        raise InputTooLongError(offset + exc.index, exc.length, exc.limit) from None


def _tokenize_long(
    index: int, text: str, prompt: str, truncate: bool, tokenizer: TextTokenizer, first_prefix: int
) -> TokenizedInput:
    """One long text: prefixes of growing length until one has more tokens than the limit."""
    limit = tokenizer.max_input_tokens
    prefix_chars = first_prefix
    while prefix_chars < len(text):
        window = text.rfind(" ", prefix_chars - CUT_SEARCH_CHARS, prefix_chars)
        prefix = text[: window if window > 0 else prefix_chars]
        if len(tokenizer.tokenizer.encode(prompt + prefix).ids) > limit + CUT_MARGIN_TOKENS:
            if not truncate:
                raise InputTooLongError(
                    index,
                    f"more than {limit + CUT_MARGIN_TOKENS} tokens (counted in its first {len(prefix)} characters)",
                    limit,
                )
            return tokenizer.encode_texts([prefix], prompt=prompt, truncate=True)[0]
        prefix_chars *= 4
    return _encode([text], index, prompt, truncate, tokenizer)[0]


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
