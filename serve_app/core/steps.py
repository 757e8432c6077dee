"""Work in steps: a generator yields between pieces of a computation so that its caller can
stop there and go on later (the scheduler lets a query in); its return value is the result."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar, cast

T = TypeVar("T")

Steps = Generator[None, None, T]


def run_steps(steps: Steps[T], should_stop: Callable[[], bool] | None = None) -> tuple[bool, T | None]:
    """Run ``steps`` until they end, ``(True, result)``, or ``should_stop()`` is true after a
    step, ``(False, None)``: calling again goes on from there."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return True, done.value
        if should_stop is not None and should_stop():
            return False, None


def run_to_end(steps: Steps[T]) -> T:
    """Every remaining step of ``steps``, without stopping; its result."""
    return cast(T, run_steps(steps)[1])
