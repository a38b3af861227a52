"""Supervising in the foreground: the supervisor loop in this process, a live rich display beside it."""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from .status import gather
from .supervise import serve
from .view import render_status


def run_foreground(run_dir: Path, rung_index: int | None, console: Console, fresh_budget: bool = False) -> int:
    """Supervise `run_dir` here; lines go above a live status panel on a terminal, plain lines otherwise."""
    def echo(message: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(message)}", highlight=False)

    if not console.is_terminal:
        code = serve(run_dir, rung_index, fresh_budget, echo=echo)
    else:
        with Live(get_renderable=lambda: render_status(gather(run_dir)), console=console,
                  refresh_per_second=1, transient=True):
            code = serve(run_dir, rung_index, fresh_budget, echo=echo)
    console.print(render_status(gather(run_dir)))
    return code
