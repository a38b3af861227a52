"""Starting a run: check its config and data, check that it may start, freeze its config, launch its supervisor.

Shared by `trainctl start`, `resume`, `demo` and `service install`; the supervisor runs here in the
foreground, or detached in its own session. Everything that can be checked is checked before the run
folder is made or changed: a refused command changes nothing.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import filelock
from rich.markup import escape

from trainctl.contract import fsio, split
from trainctl.contract.config import Config, ConfigError, to_toml
from trainctl.contract.lifecycle import State, is_final
from trainctl.contract.names import shell_path, shell_run
from trainctl.contract.protocol import ExitCode, read_heartbeat
from trainctl.contract.runfolder import (BAD_IMAGES_FILE, CHECKPOINT_DIR, CONFIG_FILE, DATA_MANIFEST_FILE, EVIDENCE_DIR,
                                         FAULTS_FIRED_DIR, HEARTBEAT_FILE, JOURNAL_FILE, LABELS_FILE, LOG_DIR, LOGS,
                                         METRICS_FILE, MODEL_FILE, REPORT_FILE, REPORT_JSON, STATE_FILE, SUPERVISOR_LOG,
                                         TENSORBOARD_DIR, committed_before, newest_checkpoint)

from . import runstate
from .errors import AlreadyRunning, Refused, RunFailed
from .runs import remember
from .status import is_run_dir
from .terminal import console, error

BOOT_WAIT_SECONDS = 120.0
PREFLIGHT_SECONDS = 300.0    # a torch + timm import: seconds, or minutes on a cold disk
RUNNING_PID_WAIT_SECONDS = 5.0
START_LOCK_WAIT_SECONDS = 30.0   # a racing start holds it until its supervisor holds the run: about a second
# What a run that never trained leaves behind: cleared before a new start takes its folder.
HISTORY_FILES = (STATE_FILE, JOURNAL_FILE, JOURNAL_FILE + "-wal", JOURNAL_FILE + "-shm", HEARTBEAT_FILE, METRICS_FILE,
                 BAD_IMAGES_FILE, LABELS_FILE, REPORT_FILE, REPORT_JSON, DATA_MANIFEST_FILE)
HISTORY_DIRS = (EVIDENCE_DIR, FAULTS_FIRED_DIR, TENSORBOARD_DIR)


def check_data(cfg: Config) -> None:
    """Data folders checked now, in one clear line, rather than by the worker later."""
    train, _ = split.train_and_val(cfg)   # what the worker will train on: without a val_split's held-out share
    if len(train) < cfg.train.effective_batch_size:
        held = f" (after [data] val_split = {cfg.data.val_split:g} held some out)" if train.held_out else ""
        raise ConfigError(f"[data] train_dir has {len(train)} images{held}, fewer than one [train] effective_batch_size "
                          f"({cfg.train.effective_batch_size}). Fix: add images or lower effective_batch_size.")


def running(run_dir: Path, not_pid: int | None = None) -> str:
    """'NAME is already running (supervisor pid N)': the one way a refusal for a running run reads."""
    pid = getattr(runstate.read_state(run_dir), "supervisor_pid", None)
    known = pid is not None and pid != not_pid
    return f"{Path(run_dir).name} is already running" + (f" (supervisor pid {pid})" if known else "")


def check_can_start(run_dir: Path) -> None:
    """A new run may not take a folder that holds another run (running, unfinished or succeeded)."""
    if not run_dir.exists():
        return
    if not is_run_dir(run_dir):
        if any(run_dir.iterdir()):
            raise Refused(f"{run_dir} exists and is not a trainctl run. Fix: choose another [run] name or runs_dir.",
                          ExitCode.REFUSED)
        return
    if runstate.supervisor_alive(run_dir):
        raise AlreadyRunning(running(run_dir))
    saved = runstate.read_state(run_dir)
    if saved and saved.state is State.SUCCEEDED:
        raise Refused(f"run {run_dir.name} already succeeded ({run_dir / MODEL_FILE}). Fix: give the new run "
                      f"another [run] name, or move the old folder away.", ExitCode.REFUSED)
    newest = newest_checkpoint(run_dir)
    if newest:
        raise Refused(f"{run_dir} holds an unfinished run (newest checkpoint: step {newest.step}). "
                      f"Continue it with: trainctl resume {shell_run(run_dir)} — or choose another [run] name.",
                      ExitCode.REFUSED)
    if committed_before(run_dir / CHECKPOINT_DIR):   # it trained, but none of its checkpoints passed the checks
        raise Refused(f"{run_dir} holds a run that trained, but none of its checkpoints verifies (see: trainctl status "
                      f"{shell_run(run_dir)}). Fix: put a good checkpoint back, start it over with: trainctl resume "
                      f"{shell_run(run_dir)} --from-scratch — or choose another [run] name.", ExitCode.REFUSED)
    # Never trained (e.g. it failed on a config error): nothing to lose; `clear_history` starts it afresh.


def preflight(config_path: Path) -> None:
    """What only torch and timm can check (model name, devices, weights file, optimizer, scheduler), in a
    worker process, before a run folder exists: a ConfigError now instead of a failed run later.

    A check that cannot run at all (a broken environment) is said and passed over: the worker checks again.
    """
    cmd = [sys.executable, "-m", "trainctl.worker", "--check-config", str(config_path)]
    env = {k: v for k, v in os.environ.items() if k != "TRAINCTL_SUPERVISOR_PID"}
    with console.status("checking the model and the devices (imports torch and timm)..."):
        try:
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                                    timeout=PREFLIGHT_SECONDS)
        except subprocess.TimeoutExpired:
            error("warning", f"the pre-flight check took over {PREFLIGHT_SECONDS:.0f} s; going on without it")
            return
    if result.returncode == ExitCode.OK:
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode == ExitCode.CONFIG_ERROR and lines:
        raise ConfigError(lines[-1].removeprefix("[trainctl] config_error: "))
    error("warning", f"the pre-flight check could not run (exit {result.returncode}: "
                     f"{lines[-1] if lines else 'no output'}); going on, the worker checks again")


def clear_history(run_dir: Path) -> None:
    """Before a new start takes the folder of a run that never trained: its state, journal, report, evidence
    and logs go (only trainctl's own files), so the new run's history begins empty."""
    if not is_run_dir(run_dir) or newest_checkpoint(run_dir) is not None or committed_before(run_dir / CHECKPOINT_DIR):
        return
    lock = runstate.acquire(run_dir, timeout=0)   # a start racing this one may not lose its files to us
    try:
        for name in HISTORY_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for name in HISTORY_DIRS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for log in LOGS:
            for path in [run_dir / LOG_DIR / log, *(run_dir / LOG_DIR).glob(f"{log}.[0-9]")]:
                path.unlink(missing_ok=True)
    finally:
        lock.release()


@contextlib.contextmanager
def starting(run_dir: Path):
    """One `trainctl start` of a run at a time, from its last check until its supervisor holds the run (detached:
    `start_detached` lets go then; foreground: at the end). The loser of two racing starts waits, checks again,
    is refused, and changes nothing: only the winner's config is frozen."""
    lock = filelock.FileLock(run_dir.parent / f".{run_dir.name}.start.lock")
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=START_LOCK_WAIT_SECONDS)
    except filelock.Timeout:
        raise AlreadyRunning(f"another trainctl start of {run_dir.name} is under way") from None
    except OSError:   # runs_dir unwritable (a file, read-only): `freeze` says so in one line, with its fix
        yield None
        return
    try:
        yield lock
    finally:
        lock.release()


def freeze(run_dir: Path, cfg: Config) -> None:
    """Create the run folder with its frozen config, and remember it."""
    try:
        (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
        fsio.atomic_write(run_dir / CONFIG_FILE, to_toml(cfg))
    except OSError as e:   # read-only, a file in the way, no space: checked before, but the disk may differ now
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = "free space on that disk" if full else "set [run] runs_dir to a folder you can write to"
        raise ConfigError(f"cannot write the run folder {run_dir}: {e.strerror or e}. Fix: {fix}.") from None
    remember(run_dir)


ROOM_PROBE_BYTES = 1 << 20   # what a supervisor writes before its first checkpoint: state, journal, logs


def check_room(run_dir: Path) -> None:
    """A disk too full to write the run's records refuses the command in one line (a supervisor started anyway
    could not even say why it failed): a probe file is written, synced and removed."""
    probe = Path(run_dir) / f".room-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(ROOM_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        free = shutil.disk_usage(run_dir).free
        raise Refused(f"no room to write in {run_dir} ({e.strerror or e}; {megabytes(free)} free). Fix: free some "
                      f"disk space, then run the command again; the run's checkpoints are untouched.",
                      ExitCode.REFUSED) from None
    finally:
        probe.unlink(missing_ok=True)


def megabytes(size: int) -> str:
    """'about 20 MB', '1.4 GB': a size with the precision a person needs to free space."""
    return f"about {size / 1e6:.0f} MB" if size < 1e9 else f"{size / 1e9:.1f} GB"


def launch(run_dir: Path, rung_index: int | None, foreground: bool, fresh_budget: bool = False,
           headline: str | None = None, start_lock: filelock.FileLock | None = None) -> int:
    """Supervise the run here (foreground) or start a detached supervisor; return the exit code.

    `headline` is what the person is told once it runs ("started run NAME" unless given); `start_lock`
    (from `starting`) is let go once a detached supervisor holds the run.
    """
    headline = headline or f"started run {run_dir.name}"
    check_room(run_dir)
    if foreground:
        from .foreground import run_foreground
        return run_foreground(run_dir, rung_index, console, fresh_budget, headline)
    return start_detached(run_dir, rung_index, fresh_budget, headline, start_lock)


def start_detached(run_dir: Path, rung_index: int | None, fresh_budget: bool = False,
                   headline: str | None = None, start_lock: filelock.FileLock | None = None) -> int:
    """Start the supervisor in its own session; return once it is up and its worker passed its sanity check
    (ConfigError or RunFailed, with the supervisor's reason, when the run failed instead)."""
    cmd = [sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)]
    if rung_index is not None:
        cmd += ["--rung", str(rung_index + 1)]
    if fresh_budget:
        cmd.append("--fresh-budget")
    (run_dir / LOG_DIR).mkdir(exist_ok=True)
    log_path = run_dir / LOG_DIR / SUPERVISOR_LOG
    with open(log_path, "ab") as log:
        offset = log.tell()   # our supervisor's lines start here (another one may append too)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + BOOT_WAIT_SECONDS
    with console.status("starting the supervisor and the worker (imports, model, sanity check)..."):
        while time.monotonic() < deadline:
            rc = proc.poll()
            saved = runstate.read_state(run_dir)
            mine = saved is not None and saved.supervisor_pid == proc.pid
            if start_lock is not None and (mine or rc is not None):
                start_lock.release()   # our supervisor holds the run (or is gone): a racing start may look now
            if rc is not None and not (mine and is_final(saved.state)):
                if rc == ExitCode.RUNNING:   # another start won the race: its lines are not ours to show
                    raise AlreadyRunning(_winner(run_dir, proc.pid))
                raise Refused("the supervisor did not start: " + _own_lines(log_path, offset),
                              rc if rc == ExitCode.BAD_CONFIG else ExitCode.FAILED)
            if mine and saved.state is State.FAILED:
                reason = saved.reason or "unknown"
                if reason.startswith("config_error"):
                    raise ConfigError(reason.removeprefix("config_error: "))
                raise RunFailed(reason)
            hb = read_heartbeat(run_dir)
            booted = hb is not None and mine and hb.attempt == saved.attempt and hb.phase.booted
            # Not BACKOFF: a worker that cannot even start (a broken torch) backs off once before the run fails,
            # and the person must hear that failure and its line, not "started".
            if mine and (booted or saved.state is State.RUNNING or is_final(saved.state)):
                break
            time.sleep(0.2)
    name = escape(shell_run(run_dir))   # hints a person may paste: shell words, never an option or a command
    console.print(f"[green]{escape(headline or f'started run {run_dir.name}')}[/] — supervisor pid {proc.pid}\n"
                  f"  folder:  {escape(shell_path(run_dir))}\n  status:  trainctl status {name}\n"
                  f"  logs:    trainctl logs {name} -f\n  stop:    trainctl stop {name}", highlight=False, soft_wrap=True)
    return ExitCode.OK


def _winner(run_dir: Path, loser: int) -> str:
    """The refusal when another supervisor holds the run, with its pid once its state.json names it."""
    def named() -> bool:   # a live pid that is not the loser's (not one left by an earlier, dead supervisor)
        pid = getattr(runstate.read_state(run_dir), "supervisor_pid", None)
        if pid in (None, loser):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    deadline = time.monotonic() + RUNNING_PID_WAIT_SECONDS
    while not named() and time.monotonic() < deadline:
        time.sleep(0.1)
    return running(run_dir, not_pid=loser) if named() else f"{run_dir.name} is already running"


def _own_lines(log_path: Path, offset: int) -> str:
    """What our supervisor said about why it stopped (its own 'trainctl supervisor:' lines, else the last lines)."""
    with contextlib.suppress(OSError), open(log_path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", "replace").strip().splitlines()
        own = [line for line in lines if line.startswith("trainctl supervisor")]
        return " | ".join((own or lines)[-3:]) or "no output"
    return "no output"
