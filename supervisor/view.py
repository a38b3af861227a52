"""Rich renderings of a run's status (the `Status` from `status.gather`) and of the list of runs."""
from __future__ import annotations

import time

from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from trainctl.contract.lifecycle import State
from trainctl.contract.records import Status
from trainctl.contract.runfolder import is_finite_number

from .memory_watch import pressure_words
from .text import ago, duration, gib, percent, plural

STATE_STYLE = {State.STARTING: "cyan", State.RUNNING: "green", State.BACKOFF: "yellow", State.STOPPING: "yellow",
               State.STOPPED: "magenta", State.SUCCEEDED: "bold green", State.FAILED: "bold red"}
BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list, width: int = 30) -> str:
    """A small unicode trend line of the last `width` finite values (None, NaN and inf are left out)."""
    values = [v for v in values if is_finite_number(v)][-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(BLOCKS[int((v - lo) / span * (len(BLOCKS) - 1))] for v in values)


def number(value, spec: str) -> str:
    """`value` formatted with `spec`; 'not finite' for NaN and inf, '—' for anything else that is no number."""
    if is_finite_number(value):
        return format(value, spec)
    return "not finite" if isinstance(value, float) else "—"


def render_status(st: Status):
    """The full status view."""
    state = st.state
    title = Text.assemble((st.run_name, "bold"), "  ", (state.upper(), STATE_STYLE.get(state, "")))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()

    def row(label: str, value) -> None:   # plain strings are data, never rich markup
        grid.add_row(label, Text(value) if isinstance(value, str) else value)
    if st.reason:
        row("reason", Text(st.reason, style="red" if state == State.FAILED else "yellow"))
    r = st.rung
    if r.device:
        group = f" x{r.nproc_per_node} processes," if (r.nproc_per_node or 1) > 1 else ""
        row("rung", f"{r.number}/{r.of or '?'}: {r.device}{group} batch {r.batch_size} x accum {r.grad_accum}")
    if st.ranks:
        row("ranks", ", ".join(f"{k.get('rank')}: pid {k.get('pid')} {k.get('device')}" for k in st.ranks))
    total, step = st.total_steps, st.step
    if total:
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=total, completed=step, width=30),
                    f"step {step}/{total}  epoch {min((st.epoch or 0) + 1, st.epochs or 1)}/{st.epochs or '?'}")
        row("progress", bar)
    elif step:   # a worker booting: where the run stands until it has loaded its checkpoint
        row("progress", f"step {step}" + (f" (worker {st.phase})" if st.phase else ""))
    m = st.metrics
    if m.get("loss"):
        row("loss", f"{number(m['loss'][-1], '.4f')}  {sparkline(m['loss'])}")
        row("train acc", f"{number((m.get('acc') or [None])[-1], '.3f')}  {sparkline(m.get('acc') or [])}")
    if m.get("val_acc"):
        row("val acc", f"{number(m['val_acc'][-1], '.3f')}  {sparkline(m['val_acc'])}  (per epoch)")
    if m.get("val_top5"):   # only runs of more than 5 classes measure it
        row("val top-5", f"{number(m['val_top5'][-1], '.3f')}  {sparkline(m['val_top5'])}  (per epoch)")
    if m.get("ema_val_acc"):   # [ema] enabled: the moving average of the weights, validated beside them
        row("ema val acc", f"{number(m['ema_val_acc'][-1], '.3f')}  {sparkline(m['ema_val_acc'])}  (per epoch)")
    if is_finite_number(st.images_per_sec) and st.images_per_sec and state in (State.RUNNING, State.STARTING):
        eta = st.eta_seconds if is_finite_number(st.eta_seconds) else None
        row("speed", f"{st.images_per_sec:.1f} images/s   ETA {duration(eta)}")
    mem = st.memory
    if mem.get("worker") or mem.get("mps_driver_allocated"):
        extra = f"  (MPS driver {gib(mem['mps_driver_allocated'])})" if mem.get("mps_driver_allocated") else ""
        row("memory", f"worker {gib(mem.get('worker'))}, system available {gib(mem.get('available'))}"
                               f" of {gib(mem.get('total'))}, swap {gib(mem.get('swap_used'))}{extra}")
    pressure = mem.get("pressure")
    if isinstance(pressure, dict) and isinstance(pressure.get("level"), str):   # the OS's signal, where it has one
        row("pressure", f"{pressure['level']} ({pressure_words(pressure)})")
    ck = st.last_checkpoint
    row("checkpoint", f"step {ck.step}, {duration(ck.age_seconds)} ago"
                      + (f" (at failure: {ck.at_failure})" if ck.at_failure else "") if ck else "none yet")
    if st.set_aside_checkpoints:   # failed verification: kept in checkpoints/corrupt/, never trusted
        last = st.set_aside_checkpoints[-1]
        row("set aside", f"{plural(len(st.set_aside_checkpoints), 'checkpoint')} failed verification, kept in "
                         f"{st.run_dir}/checkpoints/corrupt/ (latest: {last['file']}: {last['reason']})")
    row("restarts", str(st.restarts))
    if st.bad_images:
        row("bad images", f"{st.bad_images} (listed in {st.run_dir}/bad_images.json)")
    if st.final_model:
        row("model", st.final_model)
    summary = st.summary
    if summary:   # goodput "—": the run never trained (a config error at boot)
        row("night", f"wall {duration(summary['wall_seconds'])}, goodput {percent(summary['goodput'])} (training "
                     f"{duration(summary['training_seconds'])}, re-done {duration(summary['redone_seconds'])}, "
                     f"restarts {duration(summary['restart_seconds'])}), "
                     f"{plural(summary['checkpoints_written'], 'checkpoint')}")
    if st.report:
        row("report", st.report)
    if summary and summary.get("figure"):   # report.png, named relative to the run folder in report.json
        row("figure", f"{st.run_dir}/{summary['figure']}")
    if st.supervisor_alive:
        row("pids", f"supervisor {st.supervisor_pid}, worker {st.worker_pid or '—'}")
    parts = [grid]
    if st.crashes:
        shown = st.crashes[-8:]
        evidence = any(c.evidence for c in shown)   # only files that exist and hold something (status.gather)
        crashes = Table("when", "kind", "signal/exit", "rung", "step", "detail", *(["evidence"] if evidence else []),
                        box=None, header_style="dim")
        for c in shown:
            crashes.add_row(c.at[11:], c.kind, c.signal or str(c.exit_code), str(c.rung),
                            str(c.step if c.step is not None else "—"), Text((c.detail or "")[:70]),
                            *([Text(_within(c.evidence, st.run_dir))] if evidence else []))
        parts += [Text(f"crashes ({len(st.crashes)})", style="bold"), crashes]
    return Panel(Group(*parts), title=title, title_align="left", subtitle=st.run_dir, subtitle_align="right")


def _within(path: str | None, folder: str) -> str:
    """`path` relative to the run folder when it lies in it ('evidence/attempt-002.error.json'); '' for none."""
    if not path:
        return ""
    prefix = folder.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def render_list(rows: list[Status]):
    table = Table("run", "state", "progress", "val acc", "updated", "folder", header_style="bold")
    for column in table.columns:   # long names and folders wrap onto more lines instead of being cut
        column.overflow = "fold"
    now = time.time()
    for st in rows:
        progress = f"{st.step}/{st.total_steps}" if st.total_steps else "—"
        val = st.metrics.get("val_acc") or [None]
        table.add_row(Text(st.run_name), Text(st.state, style=STATE_STYLE.get(st.state, "")), progress,
                      number(val[-1], ".3f"),
                      ago(now - st.updated_at) if st.updated_at else "—", Text(st.run_dir))
    return table
