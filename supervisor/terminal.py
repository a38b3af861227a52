"""The terminal: one console for output, one for errors, shared by every command."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True)


def error(label: str, message: str) -> None:
    """One red label and a plain message on stderr (the message is data, never rich markup)."""
    err.print(f"[red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)
