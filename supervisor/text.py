"""How numbers read to people: durations, ages, sizes, shares. One formatter each, for every view."""
from __future__ import annotations

from trainctl.contract.runfolder import is_finite_number


def duration(seconds) -> str:
    """'42s', '3m07s', '2h05m'; '—' when unknown."""
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def ago(seconds) -> str:
    """'3m07s ago'; 'never' when unknown."""
    return "never" if seconds is None else f"{duration(seconds)} ago"


def gib(value) -> str:
    """'1.25 GiB'; '—' when unknown or zero."""
    return f"{value / 2**30:.2f} GiB" if isinstance(value, (int, float)) and value else "—"


def percent(value) -> str:
    """'93.1%'; '—' when unknown."""
    return f"{value:.1%}" if isinstance(value, (int, float)) else "—"


def plural(count: int, word: str) -> str:
    """'1 checkpoint', '3 checkpoints', '0 checkpoints'."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def finite(value) -> float | None:
    """A number as status and the report show it: None for NaN, infinity and anything else that is no number (JSON
    has no NaN)."""
    return value if is_finite_number(value) else None
