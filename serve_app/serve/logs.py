"""Logging inside Ray Serve replicas."""

from __future__ import annotations

import logging


def route_core_logs_to_serve() -> None:
    """Send the encoder core's log lines (model load, warm-up) through the replica's Serve logger."""
    serve_logger = logging.getLogger("ray.serve")
    core_logger = logging.getLogger("serve_app")
    core_logger.setLevel(logging.INFO)
    core_logger.handlers = list(serve_logger.handlers)
    core_logger.propagate = False
