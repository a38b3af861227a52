"""Watching one worker: heartbeat and progress, memory limits, hangs, requests, the service manager.

A mixin of `Supervisor` (it shares the supervisor's journal, clock and state); split out so each
module keeps one concern: supervise.py runs the attempts, this module follows one attempt.
"""
from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

from trainctl.worker.protocol import LOG_DIR, WORKER_LOG, fault_log_path, read_error, read_heartbeat

from .classify import Exit, Failure, classify
from .process import WorkerProcess
from .states import State

BOOT_PHASES = ("booting", "loading", "sanity")
ABORT_GRACE_SECONDS = 5.0      # after SIGABRT, time for faulthandler to write the stacks
STATE_TOUCH_SECONDS = 5.0


@dataclasses.dataclass
class Watch:
    """What the loop tracks about the attempt in flight."""
    attempt: int
    profile_index: int
    started_at: float
    start_step: int
    last_beat: int = -1
    last_progress_at: float = 0.0
    heartbeat: dict | None = None
    we_killed: str | None = None
    kill_deadline: float | None = None
    ready: bool = False
    last_checkpoint_step: int | None = None
    fresh_beat: bool = False       # a beat arrived since the last watchdog ping


class WatchMixin:
    def _watch(self, w: Watch) -> Failure:
        """Observe the worker until it exits; act on hangs, memory limits and requests on the way."""
        s = self.cfg.supervisor
        stop_sent = False
        while (rc := self.worker.poll()) is None:
            self._observe(w)
            now = self.clock()
            if self.stop_requested and not stop_sent:
                stop_sent = True
                if self.state in (State.STARTING, State.RUNNING):
                    self._set_state(State.STOPPING, "stop requested")
                self.echo("stop requested: asking the worker to checkpoint and exit")
                self.worker.signal(signal.SIGTERM)
                w.we_killed = w.we_killed or "stop"
                w.kill_deadline = w.kill_deadline or now + s.stop_timeout_seconds
            if self.checkpoint_requested:
                self.checkpoint_requested = False
                self.worker.signal(signal.SIGUSR1)
                self.journal.record("checkpoint_requested", w.attempt, w.profile_index)
            if w.kill_deadline is not None and now >= w.kill_deadline:
                self.echo("the worker did not exit in time: killing its process group")
                self.worker.kill_group()
                w.kill_deadline = None
            if now - self._last_touch >= STATE_TOUCH_SECONDS:
                self._write_state(durable=False)
                if self.awake:
                    self.awake.check()
            self._tell_service_manager(w)
            self.worker.wait(s.poll_seconds)   # returns at once when the worker exits: instant detection
        self.worker.kill_group()   # loader processes that outlived the worker
        self._read_heartbeat(w)    # its last word: the step it died at
        return self._classify(w, rc)

    def _observe(self, w: Watch) -> None:
        self._read_heartbeat(w)
        self._check_memory(w)

    def _read_heartbeat(self, w: Watch) -> None:
        hb = read_heartbeat(self.run_dir)
        if hb is not None and hb.get("attempt") == w.attempt:
            w.heartbeat = hb
            if hb.get("beat") != w.last_beat:
                w.last_beat, w.last_progress_at = hb.get("beat"), self.clock()
                w.fresh_beat = True
            if hb.get("phase") not in BOOT_PHASES and not w.ready:
                w.ready = True
                self.journal.record("worker_ready", w.attempt, w.profile_index, hb.get("step"),
                                    device=hb.get("device"), skipped_checkpoints=hb.get("skipped_checkpoints"))
                if self.state is State.STARTING:
                    self._set_state(State.RUNNING)
                if self.cfg.supervisor.warm_standby and self.standby is None:
                    self.standby = WorkerProcess.spawn_standby(self.run_dir)   # the next worker, already booted
            ckpt = hb.get("last_checkpoint")
            if ckpt and ckpt.get("step") != w.last_checkpoint_step:
                w.last_checkpoint_step = ckpt.get("step")
                self.journal.record("checkpoint", w.attempt, w.profile_index, ckpt.get("step"), path=ckpt.get("path"),
                                    taken=ckpt.get("taken"))

    def _tell_service_manager(self, w: Watch) -> None:
        """READY after the first sanity check, STATUS lines, WATCHDOG only while healthy."""
        if not self.notifier.active:
            return
        hb = w.heartbeat or {}
        if w.ready:
            self.notifier.ready(self._status_line(hb))
            self.notifier.status(self._status_line(hb))
        if self._healthy(w):
            self.notifier.watchdog()

    def _healthy(self, w: Watch) -> bool:
        """Training: a new beat since the last ping. Booting: still within the startup timeout."""
        if w.we_killed is not None:
            return False
        if w.ready and (w.heartbeat or {}).get("phase") not in BOOT_PHASES:
            fresh, w.fresh_beat = w.fresh_beat, False
            return fresh
        return self.clock() - w.last_progress_at < self.cfg.supervisor.startup_timeout_seconds

    def _status_line(self, hb: dict) -> str:
        rung = self.cfg.profiles[self.profile_index].describe(self.cfg.train.effective_batch_size)
        loss = f" loss {hb['loss']:.4f}" if isinstance(hb.get("loss"), (int, float)) else ""
        return (f"{self.state.value}: epoch {(hb.get('epoch') or 0) + 1}/{hb.get('epochs', '?')} step "
                f"{hb.get('step', 0)}/{hb.get('total_steps', '?')}{loss} | rung {self.profile_index + 1} ({rung})"
                f" | restarts {self.restarts}")

    def _check_memory(self, w: Watch) -> None:
        reported = int((w.heartbeat or {}).get("mps_driver_allocated", 0))
        sample = self.sample_memory(self.worker.pid, reported)
        self.memory.append(sample)
        if w.we_killed in ("hang", "memory_hard"):
            return
        if self.hard_limit and sample.worker >= self.hard_limit:
            w.we_killed = "memory_hard"
            self.journal.record("memory_hard_limit", w.attempt, w.profile_index, worker=sample.worker, limit=self.hard_limit)
            self.echo(f"worker memory {sample.worker / 2**30:.2f} GiB is past the hard limit: killing it")
            self.worker.kill_group()
        elif self.soft_limit and sample.worker >= self.soft_limit and w.we_killed is None:
            w.we_killed = "memory_soft"
            w.kill_deadline = self.clock() + self.cfg.supervisor.stop_timeout_seconds
            self.journal.record("memory_soft_limit", w.attempt, w.profile_index, worker=sample.worker, limit=self.soft_limit)
            self.echo(f"worker memory {sample.worker / 2**30:.2f} GiB is past the soft limit: "
                      f"checkpoint and stop, then continue on the next rung")
            self.worker.signal(signal.SIGTERM)
        elif w.we_killed is None:
            self._check_hang(w)

    def _check_hang(self, w: Watch) -> None:
        s = self.cfg.supervisor
        phase = (w.heartbeat or {}).get("phase", "booting")
        limit = s.startup_timeout_seconds if phase in BOOT_PHASES else s.hang_timeout_seconds
        silent = self.clock() - w.last_progress_at
        if silent < limit:
            return
        w.we_killed = "hang"
        self.journal.record("hang_detected", w.attempt, w.profile_index, (w.heartbeat or {}).get("step"),
                            phase=phase, silent_seconds=round(silent, 1))
        self.echo(f"no progress for {silent:.0f} s (phase {phase}): SIGABRT for the stacks, then SIGKILL")
        self.worker.signal(signal.SIGABRT)
        self.worker.signal(signal.SIGCONT)   # a stopped (SIGSTOP) process must run to take the SIGABRT
        w.kill_deadline = self.clock() + ABORT_GRACE_SECONDS

    def _classify(self, w: Watch, rc: int) -> Failure:
        error = read_error(self.run_dir, w.attempt)
        ended = Exit(returncode=rc, heartbeat_seen=w.heartbeat is not None, we_killed=w.we_killed
                     if w.we_killed != "stop" else None, error=error,
                     fault_log=_tail(fault_log_path(self.run_dir, w.attempt), 8000),
                     output_tail=_tail(self.run_dir / LOG_DIR / WORKER_LOG, 3000))
        return classify(ended, list(self.memory), self.soft_limit)


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
