"""The supervisor loop: observe the worker, ask the policy, apply its answer, journal everything.

One attempt = one worker process. The loop never decides anything itself: `classify` names the
exit, `decide` picks the action. Time is the supervisor's own monotonic clock throughout.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import filelock

from trainctl.worker import fsio
from trainctl.worker.config import Config, parse_memory_limit
from trainctl.worker.protocol import (CHECKPOINT_DIR, LOG_DIR, MODEL_FILE, ORPHAN_GRACE_SECONDS,
                                      SUPERVISOR_LOG, WORKER_LOCK, WORKER_LOG, committed_checkpoints,
                                      error_json_path, fault_log_path, read_heartbeat)

from . import logfiles
from . import memory as memorylib
from . import report, runstate
from .awake import KeepAwake
from .classify import Failure, Kind, MemorySample
from .journal import Journal
from .notify import Notifier
from .service import SERVICE_LOG
from .policy import Action, Attempt, Do, Settings, decide
from .process import WorkerProcess, orphans, settle_orphans
from .states import State, check_transition
from .watch import Watch, WatchMixin

EXIT_OK = 0          # succeeded or stopped
EXIT_GAVE_UP = 3     # failed for a reason restarting cannot fix (services must not restart it)
ERROR_JSON_KINDS = (Kind.EXCEPTION, Kind.OOM, Kind.CONFIG_ERROR, Kind.DISK_FULL)
MEMORY_HISTORY = 120


class Supervisor(WatchMixin):
    def __init__(self, run_dir: Path, cfg: Config, start_profile: int | None = None,
                 launch: Callable[..., WorkerProcess] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 sample_memory: Callable[[int, int], MemorySample] = memorylib.sample,
                 echo: Callable[[str], None] | None = None, notifier: Notifier | None = None):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.launch = launch or WorkerProcess.spawn
        self.clock, self.sleep, self.sample_memory = clock, sleep, sample_memory
        self.echo = echo or (lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True))
        s = cfg.supervisor
        self.settings = Settings(s.max_restarts_per_profile, s.backoff_seconds, s.same_step_limit)
        total = memorylib.total_memory()
        self.soft_limit = parse_memory_limit(s.memory_soft_limit, total)
        self.hard_limit = parse_memory_limit(s.memory_hard_limit, total)
        previous = runstate.read_state(self.run_dir) or {}
        self.profile_index = start_profile if start_profile is not None else previous.get("profile_index", 0)
        self.profile_index = min(max(self.profile_index, 0), len(cfg.profiles) - 1)
        self.attempt = int(previous.get("attempt", 0))
        self.restarts = int(previous.get("restarts", 0))
        self.state = State.STARTING
        self.reason: str | None = None
        self.history: list[Attempt] = []
        self.memory: collections.deque[MemorySample] = collections.deque(maxlen=MEMORY_HISTORY)
        self.worker: WorkerProcess | None = None
        self.standby: WorkerProcess | None = None
        self.stop_requested = False
        self.checkpoint_requested = False
        self._last_touch = 0.0
        self.journal = Journal(self.run_dir)
        self.notifier = notifier or Notifier()
        self.awake = KeepAwake(cfg.run.name, os.getpid(), self.echo) if s.keep_awake else None

    # ---- requests from signal handlers (they only set flags) -------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGUSR1, lambda *_: self.request_checkpoint())

    def request_stop(self) -> None:
        self.stop_requested = True

    def request_checkpoint(self) -> None:
        self.checkpoint_requested = True

    # ---- state -------------------------------------------------------------------------------
    def _set_state(self, new: State, reason: str | None = None) -> None:
        if new is not self.state:
            check_transition(self.state, new)
            self.journal.record("state", self.attempt, self.profile_index, **{"from": self.state.value,
                                                                              "to": new.value, "reason": reason})
            self.state = new
        self.reason = reason
        self._write_state(durable=True)

    def _write_state(self, durable: bool) -> None:
        profile = self.cfg.profiles[self.profile_index]
        runstate.write_state(self.run_dir, {
            "state": self.state.value, "reason": self.reason, "run_name": self.cfg.run.name,
            "supervisor_pid": os.getpid(), "worker_pid": self.worker.pid if self.worker and self.worker.poll() is None else None,
            "profile_index": self.profile_index, "profile": dataclasses.asdict(profile),
            "grad_accum": self.cfg.grad_accum(self.profile_index), "ladder_size": len(self.cfg.profiles),
            "attempt": self.attempt, "restarts": self.restarts,
            "memory": dataclasses.asdict(self.memory[-1]) if self.memory else None}, durable)
        self._last_touch = self.clock()
        for name in (WORKER_LOG, SUPERVISOR_LOG, SERVICE_LOG):
            logfiles.rotate_if_needed(self.run_dir / LOG_DIR / name, int(self.cfg.supervisor.log_max_mb * 2**20))

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Supervise until the run succeeds, stops or fails; return the supervisor's exit code."""
        self.journal.record("supervisor_start", self.attempt, self.profile_index, pid=os.getpid(),
                            python=sys.executable)
        self._settle_orphans()
        self._clean_temps()
        self._set_state(State.STARTING)
        if self.awake:
            self.awake.start()
        try:
            while True:
                if self.stop_requested:
                    return self._end(State.STOPPED, "stopped on request", EXIT_OK)
                watch = self._spawn()
                failure = self._watch(watch)
                action = self._judge(watch, failure)
                code = self._apply(action, failure)
                if code is not None:
                    return code
        finally:
            if self.worker is not None and self.worker.poll() is None:   # an internal error: no orphans
                self.worker.stop(self.cfg.supervisor.stop_timeout_seconds)
            if self.standby is not None:
                self.standby.release()
            if self.awake:
                self.awake.stop()
            self.journal.close()

    def _end(self, state: State, reason: str | None, code: int) -> int:
        """Final state: the morning report, the service manager told, the person's hook run."""
        self._set_state(state, reason)
        hb = read_heartbeat(self.run_dir) or {}
        summary = report.write(self.run_dir, state.value, reason, hb.get("val_acc"))
        self.notifier.stopping(f"{state.value}" + (f": {reason}" if reason else ""))
        hook = {State.SUCCEEDED: self.cfg.supervisor.on_finish, State.FAILED: self.cfg.supervisor.on_failure}.get(state)
        if hook:
            rc = report.run_hook(hook, self.run_dir, state.value, reason)
            self.journal.record("hook", self.attempt, self.profile_index, command=hook, exit_code=rc)
        goodput = summary.get("goodput")
        self.echo(f"report: {self.run_dir / 'report.md'}" + (f" (goodput {goodput:.1%})" if goodput else ""))
        return code

    def _settle_orphans(self) -> None:
        """A worker left by a supervisor that died gets its grace period, then is killed."""
        pending = orphans(self.run_dir)
        if not pending:
            return
        self.echo(f"an orphaned worker of a previous supervisor is still running (pid "
                  f"{', '.join(str(p.pid) for p in pending)}): letting it checkpoint and exit")
        for pid, killed in settle_orphans(self.run_dir, ORPHAN_GRACE_SECONDS + 5):
            self.journal.record("orphan", self.attempt, self.profile_index, pid=pid, killed=killed)
            if killed:
                self.echo(f"orphaned worker {pid} did not exit in time: killed its process group")

    def _clean_temps(self) -> None:
        """Leftovers of interrupted writes in the run directory, when no worker can be writing."""
        lock = filelock.FileLock(self.run_dir / WORKER_LOCK)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return   # an orphaned worker is still finishing: its files are its own
        try:
            for name in fsio.remove_stale_temps(self.run_dir):
                self.echo(f"removed {name} (an interrupted write)")
        finally:
            lock.release()

    def _spawn(self) -> Watch:
        self.attempt += 1
        if self.state is State.BACKOFF:
            self._set_state(State.STARTING)
        profile = self.cfg.profiles[self.profile_index]
        describe = profile.describe(self.cfg.train.effective_batch_size)
        start_step = _newest_checkpoint_step(self.run_dir)
        standby, self.standby = self.standby, None
        if standby is not None and standby.go(self.profile_index, self.attempt, describe):
            self.worker = standby          # warm: torch and timm are already imported
        else:
            if standby is not None:
                standby.release()
            self.worker = self.launch(self.run_dir, self.profile_index, self.attempt, describe)
        self.memory.clear()
        self.journal.record("spawn", self.attempt, self.profile_index, start_step, pid=self.worker.pid,
                            rung=dataclasses.asdict(profile))
        self.echo(f"attempt {self.attempt}: worker pid {self.worker.pid} on rung {self.profile_index} ({describe})"
                  f", from {'step ' + str(start_step) if start_step is not None else 'the start'}")
        self._write_state(durable=True)
        now = self.clock()
        return Watch(self.attempt, self.profile_index, now, start_step or 0, last_progress_at=now,
                     last_checkpoint_step=start_step)

    def _judge(self, w: Watch, failure: Failure) -> Action:
        hb = w.heartbeat or {}
        newest = _newest_checkpoint_step(self.run_dir)
        progressed = newest is not None and newest > w.start_step
        self.history.append(Attempt(w.profile_index, failure.kind, failure.detail, hb.get("step"),
                                    hb.get("epoch"), hb.get("cursor"), progressed))
        clean = failure.kind in (Kind.DONE, Kind.STOPPED)
        evidence = (error_json_path(self.run_dir, w.attempt) if failure.kind in ERROR_JSON_KINDS
                    else fault_log_path(self.run_dir, w.attempt))
        self.journal.record("exit", w.attempt, w.profile_index, hb.get("step"), failure=failure.kind.value,
                            signal=failure.signal, exit_code=failure.exit_code, detail=failure.detail,
                            epoch=hb.get("epoch"), cursor=hb.get("cursor"), memory=failure.memory,
                            evidence=None if clean else str(evidence), progressed=progressed,
                            checkpoints_written=hb.get("checkpoints_written", 0),
                            checkpoint_blocked_seconds=hb.get("checkpoint_blocked_seconds", 0.0))
        if not clean:
            self.echo(f"attempt {w.attempt} ended: {failure.kind.value} — {failure.detail}")
        action = decide(self.history, len(self.cfg.profiles), self.settings)
        if self.stop_requested and action.do in (Do.RESTART, Do.STEP_DOWN):
            action = Action(Do.STOP, action.profile_index, reason="stopped on request")
        return action

    def _apply(self, action: Action, failure: Failure) -> int | None:
        """Carry out the policy's action; return the exit code when supervision is over."""
        if action.do is Do.FINISH:
            self.journal.record("finish", self.attempt, self.profile_index, model=str(self.run_dir / MODEL_FILE))
            self.echo(f"run succeeded: {self.run_dir / MODEL_FILE}")
            return self._end(State.SUCCEEDED, None, EXIT_OK)
        if action.do is Do.STOP:
            self.echo("run stopped; resume with: trainctl resume " + self.run_dir.name)
            return self._end(State.STOPPED, action.reason, EXIT_OK)
        if action.do is Do.GIVE_UP:
            reason = action.reason
            if action.same_step is not None:
                files = self._files_of_step()
                if files:
                    reason += f"; that step's images: {', '.join(files[:8])}{' ...' if len(files) > 8 else ''}"
            self.journal.record("give_up", self.attempt, self.profile_index, action.same_step, reason=reason,
                                evidence=failure.evidence[-4000:])
            self.echo(f"giving up: {reason}")
            return self._end(State.FAILED, reason, EXIT_GAVE_UP)
        self.restarts += 1
        if action.do is Do.STEP_DOWN:
            self.journal.record("step_down", self.attempt, action.profile_index, **{"from": self.profile_index,
                                "to": action.profile_index, "reason": action.reason, "same_step": action.same_step})
            to = self.cfg.profiles[action.profile_index].describe(self.cfg.train.effective_batch_size)
            self.echo(f"stepping down to rung {action.profile_index} ({to}): {action.reason}")
            self.profile_index = action.profile_index
        else:
            self.journal.record("restart", self.attempt, self.profile_index, delay=action.delay, reason=action.reason)
            self.echo(f"restarting on rung {self.profile_index} in {action.delay:g} s")
        self._set_state(State.BACKOFF, action.reason)
        self._wait(action.delay)
        return None

    def _wait(self, seconds: float) -> None:
        """Back off, in short ticks so a stop request is not kept waiting."""
        until = self.clock() + seconds
        while not self.stop_requested and (left := until - self.clock()) > 0:
            self.sleep(min(left, self.cfg.supervisor.poll_seconds))

    def _files_of_step(self) -> list[str]:
        """The images of the step that keeps failing (the worker knows the order; ask it)."""
        last = self.history[-1]
        if last.epoch is None or last.cursor is None:
            return []
        try:
            out = subprocess.run([sys.executable, "-m", "trainctl.worker", "--run-dir", str(self.run_dir),
                                  "--describe-step", str(last.epoch), str(last.cursor)],
                                 capture_output=True, text=True, timeout=120)
            return json.loads(out.stdout) if out.returncode == 0 else []
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return []


def _newest_checkpoint_step(run_dir: Path) -> int | None:
    found = committed_checkpoints(Path(run_dir) / CHECKPOINT_DIR)
    return found[-1].step if found else None


def serve(run_dir: Path, start_profile: int | None = None, echo: Callable[[str], None] | None = None,
          on_start: Callable[[Supervisor], None] | None = None) -> int:
    """Load the run's frozen config, take its lock and supervise it to the end (raises AlreadyRunning)."""
    from trainctl.worker.config import load
    from trainctl.worker.protocol import CONFIG_FILE
    cfg = load(Path(run_dir) / CONFIG_FILE)
    lock = runstate.acquire(run_dir)
    try:
        supervisor = Supervisor(run_dir, cfg, start_profile, echo=echo)
        supervisor.install_signal_handlers()
        if on_start:
            on_start(supervisor)
        return supervisor.run()
    finally:
        lock.release()
