"""Work in steps: a generator yields between pieces of a computation so that its caller can
stop there and go on later (the scheduler lets a query in); its return value is the result."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")

Steps = Generator[None, None, T]


def run_to_end(steps: Steps[T]) -> T:
    """Every remaining step of ``steps``, without stopping; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
