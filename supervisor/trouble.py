"""A write that keeps failing (the journal, state.json, a log): said once, retried, and said again when it heals.

The run must not die because its diary is unwritable: the supervisor reports the trouble and goes on.
"""
from __future__ import annotations

from typing import Callable


class Trouble:
    """Tracks one kind of write; `failed` and `healed` speak only when the situation changes."""

    def __init__(self, what: str, echo: Callable[[str], None]):
        self.what, self.echo = what, echo
        self.failing = False

    def failed(self, error: BaseException, consequence: str) -> None:
        if not self.failing:
            self.failing = True
            self.echo(f"cannot write {self.what} ({type(error).__name__}: {error}); {consequence}")

    def healed(self, note: str = "") -> None:
        if self.failing:
            self.failing = False
            self.echo(f"{self.what} is writable again" + (f": {note}" if note else ""))
