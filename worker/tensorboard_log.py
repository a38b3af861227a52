"""``[logging] tensorboard = true``: the run's scalars and its crashes as TensorBoard event files in <run>/tensorboard/.

Written with ``torch.utils.tensorboard`` (the optional ``tensorboard`` package). The x axis is the optimizer step.
A resumed worker opens its writer with ``purge_step`` one past the step of the checkpoint it resumed from:
TensorBoard then hides what the crashed attempt logged after that checkpoint, and the curves show the run
that produced the model, each step once. Every event is flushed when it is written, so a SIGKILL loses none.
Nothing here may end the training or change it: no RNG is touched, and a writer that fails (a full disk,
the package broken at run time) is said once and logging stops for this attempt.
"""
from __future__ import annotations

import atexit
import json
import sqlite3
from pathlib import Path

from trainctl.contract.runfolder import JOURNAL_FILE, TENSORBOARD_DIR, fault_log_path, read_error

from .report import say

CRASH_TAG = "crashes"             # the text events: one per resumed attempt, at the step it resumed from


def missing_message(error: BaseException) -> str:
    """The one line for `[logging] tensorboard = true` without a usable tensorboard package."""
    why = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"[logging] tensorboard = true, but TensorBoard cannot be imported ({why}). Fix: pip install "
            f"\"trainctl[tensorboard]\" (or: pip install tensorboard) in trainctl's environment, or set "
            f"[logging] tensorboard = false")


def summary_writer_class():
    """torch's SummaryWriter; ImportError (with torch's or Python's reason) when the package is missing."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter


class Board:
    """The TensorBoard writer of one worker process; every method is a no-op when logging is off or has failed."""

    def __init__(self, writer=None):
        self.writer = writer

    @classmethod
    def open(cls, enabled: bool, run_dir: Path, start_step: int) -> Board:
        """A writer into run_dir/tensorboard/ that hides what earlier attempts logged past `start_step`."""
        if not enabled:
            return cls()
        try:
            writer_class = summary_writer_class()
        except ImportError as e:
            say(missing_message(e) + "; training goes on without it")
            return cls()
        try:
            board = cls(writer_class(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1))
        except Exception as e:   # noqa: BLE001 — a folder that cannot be made, a broken package: train without it
            say(f"TensorBoard logging is off: {type(e).__name__}: {e}; training goes on (metrics.jsonl has every value)")
            return cls()
        atexit.register(board.close)   # every way out of the worker that runs Python's exit: the last events flushed
        return board

    @property
    def on(self) -> bool:
        return self.writer is not None

    def train(self, record: dict, memory: dict | None = None) -> None:
        """A metrics.jsonl 'train' record (loss, accuracy, lr, images/s, rung...) and memory figures, at its step."""
        if not self.on:
            return
        values = {tag: record.get(key) for key, tag in TRAIN_TAGS.items()}
        for key, value in {**(memory or {}), "rss": _rss()}.items():
            if value is not None:
                values[f"memory/{key}_mib"] = value / 2**20
        self.scalars(record["step"], values)

    def val(self, record: dict) -> None:
        """A metrics.jsonl 'val' record (top-1 accuracy, top-5 with more than 5 classes, loss; with [ema] on the
        EMA's too, under val_ema/) at its step."""
        self.scalars(record["step"], {"val/accuracy": record.get("val_acc"), "val/top5": record.get("val_top5"),
                                      "val/loss": record.get("val_loss"), "val_ema/accuracy": record.get("ema_val_acc"),
                                      "val_ema/top5": record.get("ema_val_top5"), "val_ema/loss": record.get("ema_val_loss")})

    def scalars(self, step: int, values: dict) -> None:
        """Each value that is a number (None = no value: not drawn), then flush (a SIGKILL after this loses nothing)."""
        def write(writer):
            for tag, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(tag, value, step)
            writer.flush()
        self._attempt(write)

    def text(self, step: int, text: str, tag: str = CRASH_TAG) -> None:
        def write(writer):
            writer.add_text(tag, text, step)
            writer.flush()
        self._attempt(write)

    def close(self) -> None:
        """Flush and close (at exit); safe to call again."""
        self._attempt(lambda writer: writer.close())
        self.writer = None

    def _attempt(self, action) -> None:
        """Run one writer action; on any error say it once and stop logging: training must never pay for it."""
        if self.writer is None:
            return
        try:
            action(self.writer)
        except Exception as e:   # noqa: BLE001 — whatever the writer raises, the training goes on
            writer, self.writer = self.writer, None
            say(f"TensorBoard logging stopped: {type(e).__name__}: {e}; training goes on (metrics.jsonl has "
                f"every value)")
            try:
                writer.close()
            except Exception:   # noqa: BLE001 — it failed already; nothing more to say
                pass


TRAIN_TAGS = {"loss": "train/loss", "acc": "train/accuracy", "lr": "train/lr", "images_per_sec": "train/images_per_sec",
              "rung": "train/rung", "epoch": "train/epoch", "nonfinite_steps": "train/nonfinite_steps"}


def _rss() -> int | None:
    """This process's resident memory in bytes (the DataLoader workers' is theirs), or None."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except Exception:   # noqa: BLE001 — a figure for a chart, never a reason to stop
        return None


# ---- what happened before this attempt -------------------------------------------------------------------------

def resume_note(run_dir: Path, attempt: int, step: int, resumed: bool, rung_index: int | None = None) -> str | None:
    """'attempt 3 resumed from step 40 after: killed (SIGKILL) at step 47 on rung 1' (and '; now on rung 2' after a
    step-down) — None on a first start.

    From the supervisor's journal when there is one (its exit event of the attempt before), else from the
    previous attempt's evidence files (a worker run by hand)."""
    if attempt <= 1 and not resumed:
        return None
    where = f"resumed from step {step}" if resumed else "started over from step 0 (no checkpoint yet)"
    end = last_exit(run_dir, attempt)
    moved = (end is not None and rung_index is not None and end["rung"] is not None and end["rung"] != rung_index)
    return (f"attempt {attempt} {where} after: {previous_end(run_dir, attempt, end)}"
            + (f"; now on rung {rung_index + 1}" if moved else ""))


def previous_end(run_dir: Path, attempt: int, end: dict | None) -> str:
    """How the attempt before `attempt` ended, in one line; `end` is its journal exit event (last_exit) if any."""
    if end is not None:
        data = end["data"]
        signal = f" ({data['signal']})" if data.get("signal") else ""
        at = f" at step {end['step']}" if end.get("step") is not None else " before its first step"
        rung = f" on rung {end['rung'] + 1}" if end.get("rung") is not None else ""
        detail = f" — {data['detail']}" if data.get("detail") else ""
        return f"{data.get('failure', 'an unknown end')}{signal}{at}{rung}{detail}"
    before = attempt - 1
    if before < 1:   # a worker run by hand without --attempt: no earlier attempt to look up
        return "an earlier attempt that ended after the checkpoint (how is not recorded)"
    error = read_error(run_dir, before)
    if error:
        message = (str(error.get("message", "")).strip().splitlines() or [""])[0][:200]
        at = f" at step {error['step']}" if error.get("step") is not None else ""
        return f"{error.get('kind', 'exception')}{at}: {message}"
    fault = _first_line(fault_log_path(run_dir, before))
    if fault:
        return f"a native crash ({fault})"
    return f"attempt {before} ended without a report (killed by a signal such as SIGKILL, or the machine stopped)"


def last_exit(run_dir: Path, attempt: int) -> dict | None:
    """The supervisor journal's newest 'exit' event of an attempt before `attempt`: {step, rung, data}, or None.

    Read-only and tolerant: the journal's schema is supervisor/journal.py's (table events: kind, attempt,
    profile = 0-based rung, step, data JSON); the worker does not import the supervisor."""
    path = Path(run_dir) / JOURNAL_FILE
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            row = db.execute("SELECT profile, step, data FROM events WHERE kind = 'exit' AND attempt < ? "
                             "ORDER BY id DESC LIMIT 1", (attempt,)).fetchone()
        finally:
            db.close()
        if row is None:
            return None
        data = json.loads(row[2])
        return {"rung": row[0], "step": row[1], "data": data if isinstance(data, dict) else {}}
    except (sqlite3.Error, ValueError, TypeError):
        return None


def _first_line(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    return line.strip()[:200]
    except OSError:
        pass
    return None


def open_board(t, resumed: bool, on: bool = True) -> Board:
    """Trainer `t`'s board (after its checkpoint is loaded): on a resumed or restarted attempt, the note of
    what happened before goes in as a text event at the step training continues from. `on` False (a rank other
    than 0 of a group): a board that writes nothing."""
    board = Board.open(t.cfg.logging.tensorboard and on, t.run_dir, t.progress.step)
    if board.on:
        note = resume_note(t.run_dir, t.reporter.fields["attempt"], t.progress.step, resumed, t.rung_index)
        if note:
            board.text(t.progress.step, note)
    return board
