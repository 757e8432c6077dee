"""API keys: the one check of ``Authorization: Bearer <key>``, used by the ingress and Serve's proxy."""

from __future__ import annotations

import hmac

from ..errors import AuthenticationError

#: The one route answered without a key (load balancers and orchestrators probe it).
OPEN_PATHS = frozenset({"/health"})


def authenticate(authorization: str, keys: list[bytes]) -> None:
    """Raise ``AuthenticationError`` unless keys are off or the header carries one of them."""
    if not keys:
        return
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k) for k in keys):
        raise AuthenticationError("Incorrect or missing API key: send 'Authorization: Bearer <key>'")
