"""A tokenised request to the encoder replicas: plan chunks, send each to a replica, retry, gather.

Chunks spread one request over replicas (``plan_batches``); embedding is idempotent, so a chunk
whose replica is lost is sent again. The vectors come back in input order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError

from ..batching.planning import plan_batches
from ..errors import OverloadedError, RequestTimeoutError

if TYPE_CHECKING:
    from ..batching.scheduler import EmbedResult

log = logging.getLogger("ray.serve")

#: Replica failures that are safe to retry elsewhere: embedding is idempotent. A replica
#: process that dies mid-call, or the node under it, gives ActorDiedError; an unreachable
#: one ActorUnavailableError (both RayActorError); a finished result that lived in the object
#: store of a node that is gone, ObjectLostError.
RETRYABLE = (ActorDiedError, ActorUnavailableError, RayActorError, ObjectLostError, WorkerCrashedError, NodeDiedError)
MAX_ATTEMPTS = 5
RETRY_BACKOFF_S = 0.1  # before attempt 2; doubled for each further one (the request timeout bounds it all)
#: A request whose chunks came back from two deployed versions of the model (a redeploy is rolling
#: through) is sent again whole, this many times at most, so its vectors are all of one version.
MAX_MIXED_ATTEMPTS = 3


class EncoderHandle(Protocol):
    """What the ingress needs of the encoder deployment (a Serve ``DeploymentHandle``, or a fake).

    ``embed.remote(token_ids, priority)`` returns an awaitable with ``cancel()`` that gives an
    ``EmbedResult``, or the ``OverloadedError`` of a full queue; ``health.remote()`` an awaitable.
    """

    embed: Any
    health: Any


@dataclass(frozen=True)
class Embedded:
    """A request's vectors (native size, input order) and the longest wait and model time of its chunks."""

    vectors: np.ndarray
    queue_s: float
    inference_s: float


async def embed_on_replicas(
    encoder: EncoderHandle,
    token_ids: list[list[int]],
    priority: str,
    max_chunk_tokens: int,
    timeout_s: float,
    dimensions: int,
) -> Embedded:
    """Send ``token_ids`` in chunks (spread over replicas); reassemble in input order.

    The first chunk to fail fails the request and cancels the others, in the replicas too;
    so does the caller being cancelled (the client going away). Chunks answered by replicas of
    two versions of the model (during a redeploy) are never joined: the request is sent again.
    """
    lengths = [len(ids) for ids in token_ids]
    chunks = plan_batches(lengths, max_chunk_tokens)
    deadline = time.monotonic() + timeout_s
    for attempt in range(1, MAX_MIXED_ATTEMPTS + 1):
        results = await _embed_chunks(encoder, token_ids, chunks, priority, deadline - time.monotonic(), timeout_s)
        revisions = {r.revision for r in results}
        if len(revisions) == 1:
            break
        log.warning(
            "a request's chunks came from model versions %s (a redeploy is rolling through): attempt %d of %d",
            sorted(revisions),
            attempt,
            MAX_MIXED_ATTEMPTS,
        )
    else:
        raise OverloadedError("the model is being redeployed and answers came from two versions; retry shortly")
    vectors = np.empty((len(lengths), dimensions), np.float32)
    for chunk, result in zip(chunks, results):
        vectors[chunk] = result.vectors
    return Embedded(vectors, max(r.queue_s for r in results), max(r.inference_s for r in results))


async def _embed_chunks(
    encoder: EncoderHandle,
    token_ids: list[list[int]],
    chunks: list[list[int]],
    priority: str,
    wait_s: float,
    timeout_s: float,
) -> list[EmbedResult]:
    """Every chunk on a replica at once; each chunk's result in plan order."""
    tasks = [asyncio.ensure_future(_embed_chunk(encoder, [token_ids[i] for i in chunk], priority)) for chunk in chunks]
    try:
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, wait_s), return_when=asyncio.FIRST_EXCEPTION)
        failures = [exc for exc in (t.exception() for t in tasks if t in done) if exc is not None]
        if failures:
            raise failures[0]
        if pending:
            raise RequestTimeoutError(f"request not answered within {timeout_s:.0f}s; retry, or send fewer tokens")
    finally:
        for task in tasks:
            task.cancel()
    return [task.result() for task in tasks]


async def _embed_chunk(encoder: EncoderHandle, token_ids: list[list[int]], priority: str) -> EmbedResult:
    """One chunk on one replica; sent again, after a pause, while its replica is lost."""
    attempt = 1
    while True:
        response = encoder.embed.remote(token_ids, priority)
        try:
            result = await response
        except asyncio.CancelledError:
            # Awaiting a Serve response does not cancel the call when we are cancelled: say so,
            # and the replica's batcher drops the chunk's queued inputs.
            response.cancel()
            raise
        except BackPressureError:
            raise OverloadedError("all encoder replicas are at their queue limit; retry shortly") from None
        except RETRYABLE as exc:
            if attempt == MAX_ATTEMPTS:
                raise
            log.warning("encoder replica lost (%s); retrying chunk, attempt %d", type(exc).__name__, attempt + 1)
            # Serve's router drops a dead replica at once; the pause covers an unreachable one.
            await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
            attempt += 1
            continue
        if isinstance(result, OverloadedError):  # the replica's queue is full (returned, not raised)
            raise result
        return result
