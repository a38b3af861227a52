"""Supervising in the foreground: the supervisor loop in this process, a live rich display beside it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from .status import gather
from .supervise import serve
from .view import render_status


def run_foreground(run_dir: Path, profile: int | None, console: Console,
                   on_start: Callable | None = None) -> int:
    """Supervise `run_dir` here; lines go above a live status panel on a terminal, plain lines otherwise."""
    def echo(message: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(message)}", highlight=False)

    if not console.is_terminal:
        code = serve(run_dir, profile, echo=echo, on_start=on_start)
    else:
        with Live(get_renderable=lambda: render_status(gather(run_dir)), console=console,
                  refresh_per_second=1, transient=True):
            code = serve(run_dir, profile, echo=echo, on_start=on_start)
    console.print(render_status(gather(run_dir)))
    return code
