"""The supervisor loop: look at the worker, ask the pure core what to do, carry it out, journal everything.

One attempt = one worker process. The loop decides nothing itself: `watch.assess` judges every look
at a running worker, `classify` names its exit, `policy.decide` picks the next action; the loop
carries out their answers. Everything outside the run folder (processes, the sleep inhibitor,
memory, the clock, the service manager) comes in through a `Host`. Time is the supervisor's own
monotonic clock throughout.

The supervisor's own failure is not the run's: an unexpected exception is logged with its
traceback, the worker is stopped at a checkpoint, the event and the state are recorded, and the
process exits `ExitCode.INTERNAL_ERROR`, which systemd and launchd restart; the restarted
supervisor resumes the run. A journal or state.json that cannot be written is retried and reported
(`trouble.Trouble`) and costs the run nothing.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from trainctl.contract import faults
from trainctl.contract.config import Config, load
from trainctl.contract.lifecycle import Event, Kill, State
from trainctl.contract.names import shell_run
from trainctl.contract.protocol import ExitCode, read_heartbeat
from trainctl.contract.runfolder import (CONFIG_FILE, LOG_DIR, MODEL_FILE, REPORT_FILE, WORKER_LOG,
                                         error_json_path, fault_log_path, group_record_path, newest_checkpoint,
                                         read_error, read_json)

from . import logfiles, report, rung_memory, runstate, takeover
from .classify import Exit, Failure, Kind, MemorySample, classify
from .diary import Diary
from .host import Host
from .journal import read_events
from .policy import CLEAN, Action, Attempt, Do, Settings, decide, recall
from .pressure import Thresholds
from .watch import (Enter, KillGroup, Limits, Ping, Ready, Record, Say, Seen, Send, StartStandby, Tell, Touch,
                    Watch, assess, in_force, recall_pace, take_heartbeat)

ERROR_JSON_KINDS = (Kind.EXCEPTION, Kind.OOM, Kind.CONFIG_ERROR, Kind.DISK_FULL)
MEMORY_HISTORY = 120


def _print_line(message: str) -> None:
    """A timestamped line on stdout. Once its reader is gone (EPIPE, EIO) stdout is pointed at /dev/null and
    supervision goes on: the journal and state.json keep the record, nothing prints a BrokenPipeError at exit."""
    try:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)
    except OSError as e:
        import errno
        if e.errno in (errno.EPIPE, errno.EIO, errno.ENXIO):
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            finally:
                os.close(null)


class Supervisor:
    def __init__(self, run_dir: Path, cfg: Config, host: Host | None = None, start_rung: int | None = None,
                 fresh_budget: bool = False, echo: Callable[[str], None] | None = None):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.host = host or Host()
        self.echo = echo or _print_line
        self.limits = Limits.of(cfg, self.host.total_memory())
        s = cfg.supervisor
        self.settings = Settings(s.max_restarts_per_profile, s.backoff_seconds, s.same_step_limit)
        journaled = read_events(self.run_dir)
        past = recall(journaled)
        self.pace = recall_pace(journaled)   # what earlier attempts taught about this run's speed (hang timeouts)
        saved = runstate.read_state(self.run_dir)
        rung = start_rung if start_rung is not None else past.rung_index
        if rung is None and saved is not None:
            rung = saved.rung_index
        self.learned: str | None = None   # why a new run starts below its first rung (rung_memory), said at start
        if rung is None:
            rung, self.learned = rung_memory.start_rung(cfg) if s.learn_rungs else (0, None)
        self.rung_index = min(max(rung, 0), len(cfg.profiles) - 1)
        # The next attempt's number must not reuse evidence/attempt-NNN.*: state.json or the journal may be gone.
        recorded = saved.attempt if saved and isinstance(saved.attempt, int) else 0
        self.attempt = max(past.attempt, recorded, runstate.last_attempt_seen(self.run_dir))
        self.restarts, self.history = past.restarts, list(past.history)
        self.may_step_up = past.may_step_up   # false once a rung climbed to failed again (policy.recall)
        self.pressure = (self.host.pressure_reader(Thresholds(s.memory_pressure_warning, s.memory_pressure_critical))
                         if s.memory_pressure else None)
        self.fresh_budget = fresh_budget
        self.memory: collections.deque[MemorySample] = collections.deque(maxlen=MEMORY_HISTORY)
        self.worker = None
        self.notes = rung_memory.Notes(cfg)   # what this run teaches the machine's rung memory
        self.oom_baseline = None           # the OOM counters as this attempt began: read at spawn and after a SIGKILL
        self.watch: Watch | None = None    # the attempt in flight, as last assessed
        self.standby = None
        self.awake = None
        self.stop_requested = False
        self.checkpoint_requested = False
        self.started = runstate.own_start_time()   # state.json's pid + start time: liveness without the lock file
        self.lock: runstate.RunLock | None = None   # set by `serve`; checked on every touch (deleted by hand?)
        self.diary = Diary(self.run_dir, self.echo, self.host.clock, int(s.log_max_mb * 2**20), self._facts)
        self.faults = faults.from_env(self.run_dir)

    # ---- requests from signal handlers (they only set flags) -------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGUSR1, lambda *_: self.request_checkpoint())
        # A hung-up terminal (a closed window, a dropped SSH session) ends nothing: training goes on to its end
        # and records it; what can no longer be written is dropped (foreground.py, _print_line). A handler,
        # not SIG_IGN, which the hooks would inherit; the worker has a session of its own and gets no SIGHUP.
        signal.signal(signal.SIGHUP, lambda *_: None)

    def request_stop(self) -> None:
        self.stop_requested = True

    def request_checkpoint(self) -> None:
        self.checkpoint_requested = True

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Supervise until the run succeeds, stops or fails; return the supervisor's exit code."""
        try:
            return self._supervise()
        except Exception:   # noqa: BLE001 — a bug of ours must not end the run
            return self._fail_safe(traceback.format_exc())
        finally:
            if self.worker is not None and self.worker.poll() is None:
                self.worker.stop(self.cfg.supervisor.stop_timeout_seconds)
            if self.standby is not None:
                self.standby.release()
            if self.awake is not None:
                self.awake.stop()
            self.diary.close()

    def _supervise(self) -> int:
        self._record(Event.SUPERVISOR_START, pid=os.getpid(), python=sys.executable)
        if self.learned:
            self._record(Event.START_RUNG, reason=self.learned)
            self.echo(self.learned)
        if self.fresh_budget:
            takeover.grant_fresh_budget(self.history, self._record, self.echo)
            self.history = []
        takeover.settle_orphans(self.host, self.run_dir, self._record, self.echo)
        takeover.remove_interrupted_writes(self.run_dir, self.echo)
        self._set_state(State.STARTING)
        if self.cfg.supervisor.keep_awake:
            self.awake = self.host.keep_awake(self.cfg.run.name, os.getpid(), self.echo)
            self.awake.start()
        while True:
            if self.stop_requested:
                return self._end(State.STOPPED, "stopped on request", ExitCode.OK)
            w, rc = self._follow(self._spawn())
            failure = self._classify(w, rc)
            code = self._apply(self._judge(w, failure), failure)
            if code is not None:
                return code

    def _spawn(self) -> Watch:
        self.attempt += 1
        if self.state is State.BACKOFF:
            self._set_state(State.STARTING)
        text = self.cfg.rung_text(self.rung_index)
        newest = newest_checkpoint(self.run_dir)
        start_step = newest.step if newest else None
        standby, self.standby = self.standby, None
        nproc = self.cfg.profiles[self.rung_index].nproc_per_node
        if standby is not None and nproc == 1 and standby.go(self.rung_index, self.attempt, text):
            self.worker = standby          # warm: torch and timm are already imported
        else:
            if standby is not None:
                standby.release()          # a group's ranks are torchrun's to start: they boot cold
            self.worker = self.host.spawn(self.run_dir, self.rung_index, self.attempt, text,
                                          **({"nproc": nproc} if nproc > 1 else {}))
        self.oom_baseline = self.host.oom_baseline(self.worker.pid)
        self.memory.clear()
        self.notes.spawned()
        self._record(Event.SPAWN, start_step, pid=self.worker.pid,
                     rung=dataclasses.asdict(self.cfg.profiles[self.rung_index]))
        self.echo(f"attempt {self.attempt}: worker pid {self.worker.pid} on rung {self.rung_index + 1} ({text}), "
                  f"from {'step ' + str(start_step) if start_step is not None else 'the start'}")
        self.diary.write(durable=True)
        now = self.host.clock()
        return Watch(self.attempt, self.rung_index, text, self.restarts, start_step or 0, last_progress_at=now,
                     touched_at=now, checkpoint_step=start_step, started_at=now, pace=self.pace,
                     may_step_up=self.may_step_up)

    def _follow(self, w: Watch) -> tuple[Watch, int]:
        """Look at the worker every poll until it exits, carrying out what `assess` says."""
        self.watch = w
        while (rc := self.worker.poll()) is None:
            hb = self._heartbeat(w)
            for _ in self.faults.due("supervisor", hb.step if hb else None, from_step_on=True):
                raise RuntimeError("injected fault: an exception in the supervisor")
            sample = self.host.sample_memory(self.worker.pid, hb.device_memory if hb else 0)
            if self.pressure is not None and (reading := self.pressure.read()) is not None:
                sample = dataclasses.replace(sample, pressure=reading.to_json())
            self.memory.append(sample)
            requested, self.checkpoint_requested = self.checkpoint_requested, False
            w, commands = assess(w, self._seen(hb, sample, requested), self.limits)
            self.notes.beat(w.rung_index, hb.epoch if hb else None)
            self.watch = w
            self._carry_out(w, commands)
            self.diary.flush()
            self.worker.wait(self.cfg.supervisor.poll_seconds)   # returns at once when the worker exits
        self.worker.kill_group()   # loader processes that outlived the worker
        w, commands = take_heartbeat(w, self._seen(self._heartbeat(w)), self.limits)   # its last word
        self._carry_out(w, commands)
        self.pace = w.pace   # the next attempt starts from what this one taught
        return w, rc

    def _heartbeat(self, w: Watch):
        hb = read_heartbeat(self.run_dir)
        return hb if hb is not None and hb.attempt == w.attempt else None

    def _seen(self, hb, sample: MemorySample | None = None, checkpoint_requested: bool = False) -> Seen:
        return Seen(self.host.clock(), hb, sample, self.stop_requested, checkpoint_requested, self.state,
                    self.standby is not None)

    def _carry_out(self, w: Watch, commands: list) -> None:
        for c in commands:
            match c:
                case Send(sig):
                    self.worker.signal(sig)
                case KillGroup():
                    self.worker.kill_group()
                case Enter(state, reason):
                    self._set_state(state, reason)
                case Record(event, step, data):
                    self.diary.record(event, w.attempt, w.rung_index, step, **data)
                case Say(message):
                    self.echo(message)
                case Ready(status):
                    self.host.notifier.ready(status)
                case Tell(status):
                    self.host.notifier.status(status)
                case Ping():
                    self.host.notifier.watchdog()
                case Touch():
                    self.diary.touch()
                    self._check_lock()
                    if self.awake is not None:
                        self.awake.check()
                case StartStandby():
                    self.standby = self.host.spawn_standby(self.run_dir)   # the next worker, already booted

    def _classify(self, w: Watch, rc: int) -> Failure:
        unexplained = rc == -signal.SIGKILL and w.kill is None and self.oom_baseline is not None
        oom = self.host.oom_evidence(self.oom_baseline) if unexplained else None   # the kernel's word, or jetsam's
        ended = Exit(oom_evidence=oom, returncode=rc, heartbeat_seen=w.heartbeat is not None,
                     we_killed=w.kill, error=read_error(self.run_dir, w.attempt),
                     fault_log=logfiles.tail(fault_log_path(self.run_dir, w.attempt), 8000),
                     output_tail=logfiles.tail(self.run_dir / LOG_DIR / WORKER_LOG, 3000))
        return classify(ended, list(self.memory), self.limits.soft_limit)

    def _judge(self, w: Watch, failure: Failure) -> Action:
        """Journal the exit and ask the policy what comes next."""
        self._record_exit(w, failure)
        action = decide(self.history, len(self.cfg.profiles), self.settings)
        if self.stop_requested and action.do in (Do.RESTART, Do.RECYCLE, Do.STEP_DOWN, Do.STEP_UP):
            action = Action(Do.STOP, action.rung_index, reason="stopped on request")
        return action

    def _record_exit(self, w: Watch, failure: Failure) -> None:
        """An attempt ended: into the history and the journal, with its evidence."""
        hb = w.heartbeat
        newest = newest_checkpoint(self.run_dir)
        progressed = newest is not None and newest.step > w.start_step
        step, epoch, cursor = (hb.step, hb.epoch, hb.cursor) if hb else (None, None, None)
        self.history.append(Attempt(w.rung_index, failure.kind, failure.detail, step, epoch, cursor, progressed))
        if failure.kind in (Kind.OOM, Kind.MEMORY_LIMIT):
            self.notes.failed(w.rung_index, failure.kind.value)   # advice for the next run on this machine
        clean = failure.kind in CLEAN
        evidence = (error_json_path(self.run_dir, w.attempt) if failure.kind in ERROR_JSON_KINDS
                    else fault_log_path(self.run_dir, w.attempt))
        group = read_json(group_record_path(self.run_dir, w.attempt)) or {}   # a group's: which rank failed first
        self.diary.record(Event.EXIT, w.attempt, w.rung_index, step, failure=failure.kind.value,
                          rank=group.get("first_failure"), ranks=group.get("ranks"),
                          signal=failure.signal, exit_code=failure.exit_code, detail=failure.detail, epoch=epoch,
                          cursor=cursor, memory=failure.memory, evidence=None if clean else str(evidence),
                          decided_by=failure.decided_by or None,
                          progressed=progressed, checkpoints_written=hb.checkpoints_written if hb else 0,
                          checkpoint_blocked_seconds=hb.checkpoint_blocked_seconds if hb else 0.0,
                          pace=w.pace.to_json())
        if not clean:
            rank = f" in rank {group['first_failure']}" if "first_failure" in group else ""
            self.echo(f"attempt {w.attempt} ended: {failure.kind.value}{rank} — {failure.detail}")

    def _apply(self, action: Action, failure: Failure) -> int | None:
        """Carry out the policy's action; return the exit code when supervision is over."""
        if action.do is Do.FINISH:
            self.notes.stable(self.rung_index)
            self._record(Event.FINISH, model=str(self.run_dir / MODEL_FILE))
            self.echo(f"run succeeded: {self.run_dir / MODEL_FILE}")
            return self._end(State.SUCCEEDED, None, ExitCode.OK)
        if action.do is Do.STOP:
            self.echo("run stopped; resume with: trainctl resume " + shell_run(self.run_dir))
            return self._end(State.STOPPED, action.reason, ExitCode.OK)
        if action.do is Do.GIVE_UP:
            reason = action.reason
            if action.same_step is not None:
                files = self._files_of_step()
                if files:
                    reason += f"; that step's images: {', '.join(files[:8])}{' ...' if len(files) > 8 else ''}"
            self._record(Event.GIVE_UP, action.same_step, reason=reason, evidence=failure.evidence[-4000:])
            self.echo(f"giving up: {reason}")
            return self._end(State.FAILED, reason, ExitCode.FAILED)
        if action.do is Do.RECYCLE:   # planned: no restart counted, no backoff (the journal has its `recycle`)
            self.echo(f"recycling the worker: a fresh one on rung {self.rung_index + 1}")
            self._set_state(State.BACKOFF, action.reason)
            return None
        if action.do is Do.STEP_UP:
            self.diary.record(Event.STEP_UP, self.attempt, action.rung_index, **{
                "from": self.rung_index, "to": action.rung_index, "reason": action.reason})
            self.echo(f"stepping up to rung {action.rung_index + 1} ({self.cfg.rung_text(action.rung_index)}) to try "
                      f"it once: {action.reason}")
            self.rung_index = action.rung_index
            self._set_state(State.BACKOFF, action.reason)
            return None
        self.restarts += 1
        if action.do is Do.STEP_DOWN:
            self.diary.record(Event.STEP_DOWN, self.attempt, action.rung_index, **{
                "from": self.rung_index, "to": action.rung_index, "reason": action.reason,
                "same_step": action.same_step, **({"after_step_up": True} if action.after_step_up else {})})
            self.echo(f"stepping down to rung {action.rung_index + 1} ({self.cfg.rung_text(action.rung_index)}): "
                      f"{action.reason}")
            self.rung_index = action.rung_index
            self.may_step_up = self.may_step_up and not action.after_step_up
        else:
            self._record(Event.RESTART, delay=action.delay, reason=action.reason)
            self.echo(f"restarting on rung {self.rung_index + 1} in {action.delay:g} s")
        self._set_state(State.BACKOFF, action.reason)
        self._wait(action.delay)
        return None

    def _end(self, state: State, reason: str | None, code: int) -> int:
        """Final state: the morning report, the service manager told, the person's hook run."""
        self._set_state(state, reason)
        hb = read_heartbeat(self.run_dir)
        self.diary.flush()
        try:
            summary = report.write(self.run_dir, state.value, reason, hb.val_acc if hb else None)
        except OSError as e:   # a full disk: the state is recorded (or said); the report is what can wait
            self.echo(f"could not write the report ({e.strerror or e}); `trainctl status` shows the run")
            summary = {}
        self.host.notifier.stopping(f"{state.value}" + (f": {reason}" if reason else ""))
        hook = {State.SUCCEEDED: self.cfg.supervisor.on_finish, State.FAILED: self.cfg.supervisor.on_failure}.get(state)
        if hook:
            rc = report.run_hook(hook, self.run_dir, state.value, reason)
            self._record(Event.HOOK, command=hook, exit_code=rc)
        goodput = summary.get("goodput")
        self.echo(f"report: {self.run_dir / REPORT_FILE}" + (f" (goodput {goodput:.1%})" if goodput else ""))
        return code

    def _fail_safe(self, trace: str) -> int:
        """The supervisor itself failed: keep the run resumable, say what happened, exit to be restarted."""
        self.echo(f"supervisor error (a bug in trainctl, not a failure of the run):\n{trace.rstrip()}")
        what = trace.strip().splitlines()[-1]
        stopped_at = None
        try:
            if self.worker is not None and self.worker.poll() is None:
                self.echo("stopping the worker at a checkpoint, so that a restarted supervisor resumes the run")
                rc = self.worker.stop(self.cfg.supervisor.stop_timeout_seconds)
                if self.watch is not None and self.watch.attempt == self.attempt:
                    w = dataclasses.replace(self.watch, kill=self.watch.kill or Kill.STOP)   # our stop, not a crash
                    self._record_exit(w, self._classify(w, rc))
                newest = newest_checkpoint(self.run_dir)
                stopped_at = newest.step if newest else None
            self._record(Event.SUPERVISOR_ERROR, stopped_at, error=what, traceback=trace)
        except Exception:   # noqa: BLE001 — the record is best effort; the exit code still says it all
            self.echo(f"while stopping after the error:\n{traceback.format_exc().rstrip()}")
        reason = (f"supervisor error ({what}); the worker stopped"
                  + (f" with a checkpoint at step {stopped_at}" if stopped_at is not None else "")
                  + f". A service restarts it; by hand: trainctl resume {shell_run(self.run_dir)}")
        try:
            if not self.state.final:
                self._set_state(State.STOPPED, reason)
        except Exception:   # noqa: BLE001
            self.echo(f"could not record the state:\n{traceback.format_exc().rstrip()}")
        return ExitCode.INTERNAL_ERROR

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.diary.state

    def _record(self, event: Event, step: int | None = None, **data) -> None:
        self.diary.record(event, self.attempt, self.rung_index, step, **data)

    def _set_state(self, new: State, reason: str | None = None) -> None:
        self.diary.enter(new, reason, self.attempt, self.rung_index)

    def _facts(self) -> dict:
        """state.json's fields besides the state and its reason."""
        alive = self.worker is not None and self.worker.poll() is None
        return {"run_name": self.cfg.run.name, "supervisor_pid": os.getpid(), "supervisor_started": self.started,
                "worker_pid": self.worker.pid if alive else None, "rung_index": self.rung_index,
                "rung": dataclasses.asdict(self.cfg.profiles[self.rung_index]),
                "grad_accum": self.cfg.grad_accum(self.rung_index), "ladder_size": len(self.cfg.profiles),
                "attempt": self.attempt, "restarts": self.restarts,
                "memory": dataclasses.asdict(self.memory[-1]) if self.memory else None,
                **in_force(self.watch, self.limits)}   # the hang and start-up timeouts in force, for status

    def _check_lock(self) -> None:
        """The lock file deleted or replaced by hand: take a new one, and say so (state.json still names us)."""
        if self.lock is not None and (news := self.lock.retake()) is not None:
            self.echo(news)

    def _wait(self, seconds: float) -> None:
        """Back off, in short ticks so a stop request is not kept waiting."""
        until = self.host.clock() + seconds
        while not self.stop_requested and (left := until - self.host.clock()) > 0:
            self.diary.flush()
            self.host.sleep(min(left, self.cfg.supervisor.poll_seconds))

    def _files_of_step(self) -> list[str]:
        """The images of the step that keeps failing (the order is a pure function of seed and epoch)."""
        last = self.history[-1]
        if last.epoch is None or last.cursor is None:
            return []
        from trainctl.contract import folders   # numpy: loaded only when a run gives up, not for every night
        try:
            return folders.step_files(self.cfg, last.epoch, last.cursor)
        except (OSError, ValueError):
            return []


def serve(run_dir: Path, start_rung: int | None = None, fresh_budget: bool = False,
          echo: Callable[[str], None] | None = None) -> int:
    """Load the run's frozen config, take its lock and supervise it to the end (raises ConfigError, AlreadyRunning)."""
    cfg = load(Path(run_dir) / CONFIG_FILE)
    lock = runstate.acquire_alone(run_dir)
    try:
        try:
            supervisor = Supervisor(run_dir, cfg, start_rung=start_rung, fresh_budget=fresh_budget, echo=echo)
        except Exception:   # noqa: BLE001 — not the run's failure either: restart us
            print(f"supervisor error before the run began:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            return ExitCode.INTERNAL_ERROR
        supervisor.lock = lock
        supervisor.install_signal_handlers()
        return supervisor.run()
    finally:
        lock.release()
