"""Rerank (Cohere's and Jina's ``/rerank``) and score (vLLM's ``/score``) from the model's embeddings.

Both compare query-side texts with document-side texts: each is embedded once, the query side with
the model's query instruction (or the request's ``instruction``), the document side with the
model's document prompt (usually none), and a pair's score is the cosine similarity of the two
normalised vectors. The request limits of ``/v1/embeddings`` hold: documents per request
(``max_inputs_per_request``), tokens per input and per request, body size; a rerank is interactive
work unless the request says ``priority``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from ..config import ServiceConfig
from ..core.tokenization import TextTokenizer, check_request_tokens
from ..errors import InvalidRequestError
from .protocol import Priority, load_json_object


class RerankDocument(BaseModel):
    """A document given as an object (Cohere v1, Jina): only its text is ranked."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr


class RerankRequest(BaseModel):
    """POST /v1/rerank and /v2/rerank (Cohere's and Jina's shape). Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    top_n: StrictInt | None = None
    return_documents: StrictBool = False
    # Extensions, as on /v1/embeddings
    instruction: StrictStr | None = None
    truncate: StrictBool = False
    priority: Priority = "interactive"


class ScoreRequest(BaseModel):
    """POST /v1/score (vLLM's shape): ``text_1`` one text scored against each of ``text_2``, or as
    many texts as ``text_2``, scored pair by pair."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    text_1: StrictStr | list[StrictStr]
    text_2: StrictStr | list[StrictStr]
    # Extensions, as on /v1/embeddings
    instruction: StrictStr | None = None
    truncate: StrictBool = False
    priority: Priority = "interactive"


def parse_rerank(body: bytes | bytearray, config: ServiceConfig) -> RerankRequest:
    return RerankRequest.model_validate(load_json_object(body, config))


def parse_score(body: bytes | bytearray, config: ServiceConfig) -> ScoreRequest:
    return ScoreRequest.model_validate(load_json_object(body, config))


@dataclass(frozen=True)
class TextPairs:
    """Query-side and document-side texts, and the (query, document) index pairs to score, in answer order."""

    queries: list[str]
    documents: list[str]
    pairs: list[tuple[int, int]]
    instruction: str | None
    truncate: bool
    priority: Priority


def rerank_pairs(req: RerankRequest, config: ServiceConfig) -> TextPairs:
    """The query against every document; refuses what Cohere and Jina refuse."""
    documents = [d if isinstance(d, str) else d.text for d in req.documents]
    _check_texts(documents, "documents", config)
    _check_texts([req.query], "query", config)
    if req.top_n is not None and req.top_n < 1:
        raise InvalidRequestError(f"top_n must be at least 1, got {req.top_n}", param="top_n")
    return TextPairs([req.query], documents, [(0, j) for j in range(len(documents))], *_extensions(req))


def score_pairs(req: ScoreRequest, config: ServiceConfig) -> TextPairs:
    """One ``text_1`` against each ``text_2``, or pair by pair; refuses what vLLM refuses."""
    queries = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    documents = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    _check_texts(queries, "text_1", config)
    _check_texts(documents, "text_2", config)
    if len(queries) == 1:
        pairs = [(0, j) for j in range(len(documents))]
    elif len(queries) == len(documents):
        pairs = [(i, i) for i in range(len(queries))]
    else:
        raise InvalidRequestError(
            f"text_1 has {len(queries)} texts and text_2 {len(documents)}: give one text_1, or as many as text_2",
            param="text_1",
        )
    return TextPairs(queries, documents, pairs, *_extensions(req))


def _extensions(req: RerankRequest | ScoreRequest) -> tuple[str | None, bool, Priority]:
    if req.instruction is not None and not req.instruction.strip():
        raise InvalidRequestError("instruction must not be empty", param="instruction")
    return req.instruction, req.truncate, req.priority


def _check_texts(texts: list[str], param: str, config: ServiceConfig) -> None:
    if not texts:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    if len(texts) > config.max_inputs_per_request:
        raise InvalidRequestError(
            f"{param} has {len(texts)} texts; at most {config.max_inputs_per_request} are allowed per request",
            param=param,
        )
    empty = next((i for i, text in enumerate(texts) if not text), None)
    if empty is not None:
        raise InvalidRequestError(f"{param}[{empty}] is an empty string", param=param)


@dataclass(frozen=True)
class TokenizedPairs:
    """Token ids of the queries, then of the documents (what is embedded), and what to score."""

    pairs: TextPairs
    token_ids: list[list[int]]
    n_tokens: int


def tokenize_pairs(pairs: TextPairs, config: ServiceConfig, tokenizer: TextTokenizer) -> TokenizedPairs:
    """Tokenise both sides within the request's token limit, the queries with the query instruction."""
    query_prompt = tokenizer.request_prompt(pairs.instruction, "query", config.default_query_instruction)
    queries = tokenizer.encode_within_limits(pairs.queries, query_prompt, pairs.truncate, config.max_request_tokens)
    document_prompt = tokenizer.request_prompt(input_type="document")
    # each side stops tokenising past the request's limit; the check below counts both together
    documents = tokenizer.encode_within_limits(
        pairs.documents, document_prompt, pairs.truncate, config.max_request_tokens
    )
    token_ids = [t.ids for t in queries] + [t.ids for t in documents]
    n_tokens = sum(len(ids) for ids in token_ids)
    check_request_tokens(n_tokens, config.max_request_tokens)
    return TokenizedPairs(pairs, token_ids, n_tokens)


def pair_scores(tokenized: TokenizedPairs, vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair, from the vectors of ``tokenized.token_ids`` (queries first)."""
    n_queries = len(tokenized.pairs.queries)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    queries, documents = unit[:n_queries], unit[n_queries:]
    i, j = np.array(tokenized.pairs.pairs).T
    return np.einsum("ij,ij->i", queries[i], documents[j])


def render_rerank(req: RerankRequest, tokenized: TokenizedPairs, scores: np.ndarray, model_id: str) -> bytes:
    """Cohere's v2 answer (``id``, ``results``, ``meta``) with Jina's ``model`` and ``usage``: best first."""
    order = np.argsort(-scores, kind="stable")[: req.top_n]
    results: list[dict[str, Any]] = []
    for j in order:
        result: dict[str, Any] = {"index": int(j), "relevance_score": float(scores[j])}
        if req.return_documents:
            result["document"] = {"text": tokenized.pairs.documents[j]}
        results.append(result)
    return orjson.dumps(
        {
            "id": uuid.uuid4().hex,
            "model": model_id,
            "results": results,
            "usage": {"total_tokens": tokenized.n_tokens},
            "meta": {"billed_units": {"search_units": 1}},
        }
    )


def render_score(tokenized: TokenizedPairs, scores: np.ndarray, model_id: str, created: int) -> bytes:
    """vLLM's answer: one ``score`` per pair, in request order."""
    return orjson.dumps(
        {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": created,
            "model": model_id,
            "data": [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokenized.n_tokens, "total_tokens": tokenized.n_tokens, "completion_tokens": 0},
        }
    )
