"""Waiting for something to happen: poll until it does, or a deadline passes. The one poll loop,
used by the CLI, the tests and the benchmarks (wait for the event, never for a fixed time)."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "the condition") -> T:
    """The first truthy value of `predicate()`, polled every `interval` s; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
