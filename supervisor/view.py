"""Rich renderings of a run's status (the dict from `status.gather`) and of the list of runs."""
from __future__ import annotations

import time

from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"starting": "cyan", "running": "green", "backoff": "yellow", "stopping": "yellow",
               "stopped": "magenta", "succeeded": "bold green", "failed": "bold red"}
BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 30) -> str:
    """A small unicode trend line of the last `width` values."""
    values = [v for v in values if v is not None][-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(BLOCKS[int((v - lo) / span * (len(BLOCKS) - 1))] for v in values)


def duration(seconds) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def gib(value) -> str:
    return f"{value / 2**30:.2f} GiB" if isinstance(value, (int, float)) and value else "—"


def render_status(st: dict):
    """The full status view."""
    state = st["state"]
    title = Text.assemble((st["run_name"], "bold"), "  ", (state.upper(), STATE_STYLE.get(state, "")))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()

    def row(label: str, value) -> None:   # plain strings are data, never rich markup
        grid.add_row(label, Text(value) if isinstance(value, str) else value)
    if st.get("reason"):
        row("reason", Text(st["reason"], style="red" if state == "failed" else "yellow"))
    p = st["profile"]
    if p.get("device"):
        row("rung", f"{p['index'] + 1}/{p.get('ladder_size') or '?'}: {p['device']} batch "
                             f"{p['batch_size']} x accum {p['grad_accum']}")
    total, step = st.get("total_steps"), st.get("step") or 0
    if total:
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=total, completed=step, width=30),
                    f"step {step}/{total}  epoch {min((st.get('epoch') or 0) + 1, st.get('epochs') or 1)}/{st.get('epochs') or '?'}")
        row("progress", bar)
    m = st.get("metrics") or {}
    if m.get("loss"):
        row("loss", f"{m['loss'][-1]:.4f}  {sparkline(m['loss'])}")
        row("train acc", f"{m['acc'][-1]:.3f}  {sparkline(m['acc'])}")
    if m.get("val_acc"):
        row("val acc", f"{m['val_acc'][-1]:.3f}  {sparkline(m['val_acc'])}  (per epoch)")
    if st.get("images_per_sec") and state in ("running", "starting"):
        row("speed", f"{st['images_per_sec']:.1f} images/s   ETA {duration(st.get('eta_seconds'))}")
    mem = st.get("memory") or {}
    if mem.get("worker") or mem.get("mps_driver_allocated"):
        extra = f"  (MPS driver {gib(mem['mps_driver_allocated'])})" if mem.get("mps_driver_allocated") else ""
        row("memory", f"worker {gib(mem.get('worker'))}, system available {gib(mem.get('available'))}"
                               f" of {gib(mem.get('total'))}, swap {gib(mem.get('swap_used'))}{extra}")
    ck = st.get("last_checkpoint")
    row("checkpoint", f"step {ck['step']}, {duration(ck['age_seconds'])} ago" if ck else "none yet")
    row("restarts", str(st.get("restarts", 0)))
    if st.get("bad_images"):
        row("bad images", f"{st['bad_images']} (listed in {st['run_dir']}/bad_images.json)")
    if st.get("final_model"):
        row("model", st["final_model"])
    summary = st.get("summary")
    if summary and summary.get("goodput") is not None:
        row("night", f"wall {duration(summary['wall_seconds'])}, goodput {summary['goodput']:.1%} (training "
                     f"{duration(summary['training_seconds'])}, re-done {duration(summary['redone_seconds'])}, "
                     f"restarts {duration(summary['restart_seconds'])}), {summary['checkpoints_written']} checkpoints")
    if st.get("report"):
        row("report", st["report"])
    if st.get("supervisor_alive"):
        row("pids", f"supervisor {st.get('supervisor_pid')}, worker {st.get('worker_pid') or '—'}")
    parts = [grid]
    if st.get("crashes"):
        crashes = Table("when", "kind", "signal/exit", "rung", "step", "detail", box=None, header_style="dim")
        for c in st["crashes"][-8:]:
            crashes.add_row(c["at"][11:], c["kind"], c["signal"] or str(c["exit_code"]), str(c["profile_index"] + 1),
                            str(c["step"] if c["step"] is not None else "—"), Text((c.get("detail") or "")[:70]))
        parts += [Text(f"crashes ({len(st['crashes'])})", style="bold"), crashes]
    return Panel(Group(*parts), title=title, title_align="left", subtitle=st["run_dir"], subtitle_align="right")


def render_list(rows: list[dict]):
    table = Table("run", "state", "progress", "val acc", "updated", "folder", header_style="bold")
    now = time.time()
    for st in rows:
        total = st.get("total_steps")
        progress = f"{st.get('step', 0)}/{total}" if total else "—"
        val = (st.get("metrics") or {}).get("val_acc") or [None]
        table.add_row(Text(st["run_name"]), Text(st["state"], style=STATE_STYLE.get(st["state"], "")), progress,
                      f"{val[-1]:.3f}" if val[-1] is not None else "—",
                      duration(now - st["updated_at"]) + " ago" if st.get("updated_at") else "—", Text(st["run_dir"]))
    return table
