"""When to checkpoint, and the promise: no crash loses more than `every_steps` optimizer steps.

Snapshots are taken early by the number of steps the previous write took ("lead"), so the write
commits about when the interval ends; a step never starts while the newest committed checkpoint is
`every_steps` behind — then training waits for the write in flight (or writes one) first. Time-based
checkpoints (`every_seconds`) follow the same lead, without the hard wait.
"""
from __future__ import annotations

import math
import time

from trainctl.contract.runfolder import Committed

from . import device as devicelib
from .ckptwriter import Writer
from .report import say
from .snapshot import capture, shares_training_memory


def _why(marker: dict) -> str:
    return f"at failure: {marker['failure']}" if marker.get("failure") else str(marker.get("reason"))


class Checkpointing:
    def __init__(self, trainer, background: bool):
        self.t = trainer
        k = trainer.cfg.checkpoint
        self.every_steps, self.every_seconds = k.every_steps, k.every_seconds
        self.writer = Writer(trainer.ckpt_dir, k.keep_last, background=background,
                             on_phase=lambda phase, step: trainer.faults.hit(f"ckpt_{phase}", step),
                             verified=getattr(trainer, "verified", None))   # what the boot verified
        self.committed_step = trainer.progress.step   # a fresh start is step 0: reproducible from the seed
        self.snapshot_step: int | None = None
        self.snapshot_time = time.monotonic()
        self.lead_steps, self.lead_seconds = 0, 0.0
        self.blocked_seconds, self.written = 0.0, 0
        self.answered = 0                  # checkpoint requests (SIGUSR1) a snapshot has answered
        self.step_seconds = 0.0            # moving average of one optimizer step
        self._last_step_at = time.monotonic()

    @property
    def step(self) -> int:
        return self.t.progress.step

    @property
    def requested(self) -> bool:
        """A checkpoint was asked for (SIGUSR1) since the last snapshot."""
        return self.t.flags.checkpoint_requests > self.answered

    def after_step(self) -> None:
        """Collect a finished write, snapshot if due, and hold the line on the promise."""
        now = time.monotonic()
        took, self._last_step_at = now - self._last_step_at, now
        self.step_seconds = took if not self.step_seconds else 0.9 * self.step_seconds + 0.1 * took
        self._collect(self.writer.poll())
        if self._due():
            if self.requested:   # a person's request, or the system's memory pressure: give the cache back too
                devicelib.empty_cache(self.t.device)
            self.snapshot("requested" if self.requested else "interval")
        if self.every_steps and self.step - self.committed_step >= self.every_steps:
            started = time.monotonic()
            self._collect(self.writer.wait())
            if self.step - self.committed_step >= self.every_steps:   # nothing newer was in flight
                self.snapshot("interval")
                self._collect(self.writer.wait())
            self.blocked_seconds += time.monotonic() - started

    def before_update(self) -> None:
        """Before the optimizer changes the weights: a background write must have read them."""
        started = time.monotonic()
        self.writer.wait_released()
        self.blocked_seconds += time.monotonic() - started

    def _due(self) -> bool:
        if self.writer.busy or self.snapshot_step == self.step:
            return False
        if self.requested:
            return True
        if self.every_steps and self.step - self.committed_step >= self.every_steps - self.lead_steps:
            return True
        return bool(self.every_seconds) and time.monotonic() - self.snapshot_time >= self.every_seconds - self.lead_seconds

    def snapshot(self, reason: str, failure: str | None = None, taken: float | None = None) -> None:
        """Copy the state to memory and hand it to the writer (waits only for a write still in flight).
        `failure` (a checkpoint at failure) goes into the marker; `taken`: when training stood at this step."""
        started = time.monotonic()
        self._collect(self.writer.wait())
        p = self.t.progress
        asked = self.t.flags.checkpoint_requests   # answered by this snapshot; any later one by the next
        info = {"epoch": p.epoch, "cursor": p.cursor, "samples_seen": p.samples_seen, "reason": reason,
                "taken": taken or time.time(),   # when training stood at this step: re-done work after a crash counts from here
                "requested": asked > self.answered,   # SIGUSR1 answered (also when an epoch end came first)
                "profile_index": self.t.rung_index, "attempt": self.t.reporter.fields["attempt"],
                **({"failure": failure} if failure else {})}
        self.answered = asked
        background = self.writer.background
        self.writer.submit(p.step, capture(self.t, background), info,
                           shares_training_memory=background and shares_training_memory(self.t))
        self.snapshot_step, self.snapshot_time = p.step, time.monotonic()
        self.blocked_seconds += self.snapshot_time - started
        self.t.reporter.beat(checkpoint_blocked_seconds=round(self.blocked_seconds, 3))
        if not self.writer.background:
            self._collect(self.writer.poll())

    def finish(self) -> None:
        """Wait for the write in flight to commit (before exporting or exiting)."""
        self._collect(self.writer.wait())

    def stop(self) -> None:
        """Make the current step durable before a requested stop."""
        self.finish()
        if self.committed_step != self.step:
            self.snapshot("stop")
            self.finish()

    def at_failure(self, failure: str, taken: float | None) -> None:
        """The checkpoint at failure: the current step (the last completed one, Trainer.checkpoint_at_failure has put
        the state back) made durable unless it already is. Raises what its write raises."""
        try:
            self.finish()   # a write in flight first
        except Exception as e:   # noqa: BLE001 — perhaps the failure itself: this write is tried all the same
            say(f"the checkpoint write in flight failed ({type(e).__name__}: {e})")
        if self.committed_step == self.step:
            say(f"{failure}: the newest checkpoint is already step {self.step}, nothing to add")
            return
        say(f"{failure}: writing the checkpoint of step {self.step}, the last completed optimizer step, before exiting")
        self.snapshot("at_failure", failure=failure, taken=taken)
        self.finish()

    def _collect(self, done: Committed | None) -> None:
        if done is None:
            return
        self.committed_step = done.step
        self.written += 1
        # A background write overlaps training: the next snapshot starts as many steps early as the
        # last write took, so that it commits about when it is due.
        if self.writer.background and self.step_seconds:
            self.lead_steps = min(max(self.every_steps - 1, 0), math.ceil(self.writer.write_seconds / self.step_seconds))
            self.lead_seconds = self.writer.write_seconds
        self.t.reporter.beat(force=True, checkpoints_written=self.written,
                             last_checkpoint={"step": done.step, "path": str(done.path), "time": done.marker["created"],
                                              "taken": done.marker.get("taken"), "reason": done.marker.get("reason"),
                                              **({"failure": done.marker["failure"]} if done.marker.get("failure") else {})})
        say(f"checkpoint at step {done.step} committed ({done.marker['size'] / 2**20:.1f} MiB, written in "
            f"{self.writer.write_seconds:.2f} s, {_why(done.marker)})")
        self._report_set_aside()

    def _report_set_aside(self) -> None:
        """Checkpoints the writer's prune found failing verification (a forged or corrupted newer one):
        said in the log and added to the heartbeat's skipped_checkpoints (status lists checkpoints/corrupt/)."""
        found = self.writer.verified.take_set_aside()
        for name, why in found:
            say(f"set aside checkpoint {name}: {why}")
        if found:
            skipped = list(self.t.reporter.fields.get("skipped_checkpoints") or [])
            self.t.reporter.beat(force=True, skipped_checkpoints=skipped + [list(f) for f in found])


class Bystander:
    """Checkpointing on a rank other than 0 of a data-parallel group: rank 0 writes the group's checkpoints (its
    state is this rank's, step for step), so every call here is answered by doing nothing."""

    def __init__(self, trainer):
        self.committed_step = trainer.progress.step
        self.blocked_seconds = 0.0
        self.writer = _NoWriter()

    def after_step(self) -> None: ...
    def before_update(self) -> None: ...
    def snapshot(self, reason: str, failure: str | None = None, taken: float | None = None) -> None: ...
    def finish(self) -> None: ...
    def stop(self) -> None: ...
    def at_failure(self, failure: str, taken: float | None) -> None: ...


class _NoWriter:
    write_seconds = 0.0

    def drain(self) -> None: ...
