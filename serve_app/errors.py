"""One exception type per failure kind.

The encoder core, the corpus job and the HTTP layer all raise these; only the HTTP
layer (`serve_app.api.http_errors`) knows which status code and OpenAI error type each
one becomes.
"""

from __future__ import annotations


class KalmServeError(Exception):
    """Base of every error this package raises on purpose."""

    #: Name of the request field the error is about (OpenAI's ``param``), if any.
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param


# --- client mistakes -------------------------------------------------------------


class InvalidRequestError(KalmServeError):
    """The request is malformed or asks for something impossible."""


class InputTooLongError(InvalidRequestError):
    """An input has more tokens than allowed and truncation was not asked for."""

    param = "input"

    def __init__(self, index: int, length: int | str, limit: int):
        # ``length``: the count, or what is known when the input was refused before being tokenised
        # whole ("more than 32768 tokens", "5000000 characters, ...")
        measured = f"{length} tokens" if isinstance(length, int) else length
        super().__init__(
            f"input[{index}] has {measured}, more than the limit of {limit} tokens "
            f"per input; shorten it or set truncate=true to cut it to {limit} tokens"
        )
        self.index, self.length, self.limit = index, length, limit


class TokenIdOutOfRangeError(InvalidRequestError):
    """A token-id input holds an id that is not in this model's vocabulary."""

    param = "input"


class AuthenticationError(KalmServeError):
    """Missing or wrong API key."""


class ModelNotFoundError(KalmServeError):
    """The request names a model this service does not serve."""

    param = "model"


class PayloadTooLargeError(KalmServeError):
    """The request body is larger than the configured byte limit."""


class UnsupportedContentEncodingError(KalmServeError):
    """The request body is compressed (``Content-Encoding``); the service reads plain JSON only."""


class HeadersTooLargeError(KalmServeError):
    """The request's headers are larger than the configured byte limit."""


class BodyReadTimeoutError(KalmServeError):
    """The client did not finish sending its body within the configured time."""


class ClientDisconnectedError(KalmServeError):
    """The client went away before its answer was ready: nobody to answer, nothing to log as an error."""


class RouteNotFoundError(KalmServeError):
    """No route at this path."""


class MethodNotAllowedError(KalmServeError):
    """The route exists but not for this HTTP method."""


# --- service conditions ----------------------------------------------------------


class OverloadedError(KalmServeError):
    """The queues are full; the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(KalmServeError):
    """The request did not finish within the configured time."""


# --- deployment / model problems -------------------------------------------------


class ModelLoadError(KalmServeError):
    """The model directory or hub id cannot be turned into an encoder."""


class MissingWeightsError(ModelLoadError):
    """The checkpoint lacks tensors the model needs."""

    def __init__(self, missing: list[str]):
        shown = ", ".join(sorted(missing)[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        super().__init__(f"checkpoint is missing {len(missing)} weight(s): {shown}{more}")
        self.missing = sorted(missing)


# --- the offline corpus job ------------------------------------------------------


class CorpusError(KalmServeError):
    """The corpus job's input or output folder cannot be used as asked; the message says why."""
