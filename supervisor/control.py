"""What trainctl's commands do, once, for the CLI and the Python API: start, resume, stop, wait, watch, list, logs.

Each works on a run folder (`runs.resolve` turns a name into one), raises the errors of `errors` (a person's
mistake or a refusal, in one line) and says on the console what the CLI says. The CLI only parses its
arguments and turns an error into its line and exit code; `trainctl.Run` only calls these.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import time
from pathlib import Path

from rich.markup import escape

from trainctl.contract import config_rules
from trainctl.contract.config import SupervisorSection, load
from trainctl.contract.fixed import resume_changes
from trainctl.contract.lifecycle import State, is_final
from trainctl.contract.names import check_new_run, shell_run
from trainctl.contract.protocol import ExitCode
from trainctl.contract.records import Status
from trainctl.contract.runfolder import (CONFIG_FILE, LOG_DIR, MODEL_FILE, SUPERVISOR_LOG, WORKER_LOG, newest_checkpoint,
                                         set_aside_all)

from . import journal, runstate
from .errors import AlreadyRunning, ConfigError, Error, NoSpace, NotRunning, Refused, Timeout
from .launch import check_can_start, check_data, clear_history, freeze, launch, preflight, running, starting
from .runs import known_runs, local_runs, never_trained, remember
from .status import gather
from .terminal import console, error
from .waiting import wait_for

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # a full disk, a quota, a file size limit


@contextlib.contextmanager
def translated():
    """The errors the parts of a command raise, as the commands' own (`errors`); anything else is a bug and goes on."""
    try:
        yield
    except Error:
        raise
    except config_rules.ConfigError as e:
        raise ConfigError(str(e)) from None
    except runstate.AlreadyRunning as e:
        raise AlreadyRunning(str(e)) from None
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        raise NoSpace(f"cannot write {e.filename or 'a file'}: {e.strerror}. Fix: free some disk space (df -h), "
                      f"then run the command again; the run's checkpoints are untouched.") from None


# ---- start / resume --------------------------------------------------------------------------------
@translated()
def start(config: Path, foreground: bool = False, rung: int | None = None) -> tuple[Path, int]:
    """`trainctl start`: check all that can be checked, then create the run folder and start; a refused start
    writes nothing. The run folder and the exit code (detached: OK once the worker trains; foreground: the run's).
    `rung` (from 1) starts there; None: the first, or lower where this machine's rung memory says so."""
    cfg = load(config)
    if rung is not None and not 1 <= rung <= len(cfg.profiles):
        raise Refused(f"--rung {rung}: the ladder has rungs 1..{len(cfg.profiles)}", ExitCode.USAGE)
    check_new_run(cfg)
    check_data(cfg)
    run_dir = cfg.run_dir
    check_can_start(run_dir)
    preflight(Path(config))
    with starting(run_dir) as start_lock:   # a racing start of the same run: only the winner freezes its config
        check_can_start(run_dir)
        clear_history(run_dir)
        freeze(run_dir, cfg)
        return run_dir, launch(run_dir, None if rung is None else rung - 1, foreground, start_lock=start_lock)


@translated()
def resume(run_dir: Path, rung: int | None = None, config: Path | None = None, foreground: bool = False,
           from_scratch: bool = False) -> int:
    """`trainctl resume`: continue a run from its newest checkpoint (on `rung`, counted from 1), with a fresh restart
    budget (said and journaled). An edited `config` is checked against the run's checkpoints before anything is
    written: a refused resume leaves the run as it was."""
    if runstate.supervisor_alive(run_dir):
        raise AlreadyRunning(f"{running(run_dir)}; nothing to resume. See: trainctl status {shell_run(run_dir)}")
    saved = runstate.read_state(run_dir)
    if saved and saved.state is State.SUCCEEDED:
        raise Refused(f"run {run_dir.name} already succeeded: {run_dir / MODEL_FILE}")
    cfg = load(run_dir / CONFIG_FILE)
    newest = newest_checkpoint(run_dir)
    if config:
        cfg = check_edited(Path(config), cfg, run_dir, newest)
    if rung is not None and not 1 <= rung <= len(cfg.profiles):
        raise Refused(f"--rung {rung}: the ladder has rungs 1..{len(cfg.profiles)}", ExitCode.USAGE)
    if config:
        preflight(Path(config))
        freeze(run_dir, cfg)
    remember(run_dir)
    if (said := journal.check(run_dir)) is not None:   # a damaged journal: set aside, a fresh one, said once
        error("warning", said)
    where = (f"from step {newest.step} (checkpoint {newest.path})" if newest
             else "from the start (no checkpoint yet)")
    if from_scratch:   # a person's decision, e.g. after "no checkpoint verifies": nothing is deleted
        where = start_over(run_dir)
    return launch(run_dir, None if rung is None else rung - 1, foreground, fresh_budget=True,
                  headline=f"resumed {run_dir.name} {where}")


def start_over(run_dir: Path) -> str:
    """`resume --from-scratch`: set every checkpoint file aside, say so, and return where training starts."""
    dest, moved = set_aside_all(run_dir)
    data = sum(name.endswith(".pt") for name in moved)
    said = (f"moved {data} checkpoint{'s' if data != 1 else ''} of {run_dir.name} ({len(moved)} files) into {dest} "
            f"(nothing deleted); training starts over from step 0" if moved
            else f"{run_dir.name} has no checkpoint files to set aside; training starts over from step 0")
    console.print(escape(said), highlight=False, soft_wrap=True)
    return f"from step 0 (--from-scratch; checkpoints set aside in {dest})" if moved else "from step 0 (--from-scratch)"


def check_edited(path: Path, frozen, run_dir: Path, newest):
    """The edited config of `resume --config`, if the run's checkpoints allow it (else ConfigError naming `path`)."""
    cfg = load(path)
    if cfg.run_dir.resolve() != run_dir.resolve():
        raise ConfigError(f"{path} describes run {cfg.run_dir}, not {run_dir}. Fix: keep [run] name and "
                          f"runs_dir as they were.")
    changes = resume_changes(frozen, cfg) if newest else []
    if changes:
        raise ConfigError(
            f"{path} changes settings the run's checkpoints (newest: step {newest.step}) were made with: "
            f"{'; '.join(changes)}. An exact run's data order and learning-rate schedule depend on them. "
            f"Fix: put them back in {path} (the ladder, [supervisor], [checkpoint], val_dir, logging and threads "
            f"may change); to train longer or differently, start a new run (another [run] name) from this run's "
            f"weights once it has finished: [model] weights = \"{run_dir / MODEL_FILE}\".")
    check_data(cfg)
    return cfg


# ---- stop, wait, watch -----------------------------------------------------------------------------
@translated()
def stop(run_dir: Path, timeout: float | None = None) -> Status:
    """`trainctl stop`: the worker finishes its step, checkpoints and exits; the status once the supervisor is gone
    (Timeout after `timeout` s, by default the run's stop timeout + 30: it is still stopping then)."""
    saved = runstate.read_state(run_dir)
    if not runstate.supervisor_alive(run_dir) or saved is None or saved.supervisor_pid is None:
        raise NotRunning(f"run {run_dir.name} is not running (state: {gather(run_dir).state}); nothing to stop.")
    try:
        stop_timeout = load(run_dir / CONFIG_FILE).supervisor.stop_timeout_seconds
    except config_rules.ConfigError:   # a frozen value an older version allowed and this one refuses: a stop must still work
        stop_timeout = SupervisorSection().stop_timeout_seconds
    timeout = timeout if timeout is not None else stop_timeout + 30
    os.kill(saved.supervisor_pid, signal.SIGTERM)
    with console.status(f"stopping {run_dir.name}: the worker finishes its step and checkpoints..."):
        try:
            wait_for(lambda: not runstate.supervisor_alive(run_dir), timeout, 0.2)
        except TimeoutError:
            raise Timeout(f"{run_dir.name} has not stopped after {timeout:.0f} s; it is still stopping "
                          f"(see: trainctl logs {shell_run(run_dir)}). Run stop again to keep waiting.") from None
    return gather(run_dir)


def wait(run_dir: Path, timeout: float | None = None, interval: float = 1.0) -> Status:
    """The status once the run has ended (succeeded, failed or stopped) and its supervisor is gone (its report
    written, its hooks run); Timeout after `timeout` s (None: no limit)."""
    def ended() -> Status | None:
        st = gather(run_dir)
        return st if is_final(st.state) and not st.supervisor_alive else None
    try:
        return wait_for(ended, math.inf if timeout is None else timeout, interval, what=f"run {run_dir.name} to end")
    except TimeoutError:
        raise Timeout(f"run {run_dir.name} is still {gather(run_dir).state} after {timeout:g} s; it goes on. Fix: wait "
                      f"longer (no timeout waits until it ends), or stop it.") from None


def watch(run_dir: Path, interval: float = 2.0) -> Status:
    """The run's live status panel until its supervisor exits (Ctrl-C leaves earlier: KeyboardInterrupt)."""
    from .view import render_status
    st = gather(run_dir)
    with live_panel(render_status(st)) as show:
        while st.supervisor_alive:
            time.sleep(interval)
            st = gather(run_dir)
            show(render_status(st))
    return st


@contextlib.contextmanager
def live_panel(first):
    """Show `first`, then in its place each renderable passed to the function yielded: rich's Live on a terminal,
    a display updated in place in Jupyter (rich's Live would need ipywidgets there)."""
    if console.is_jupyter:
        from IPython.display import display
        yield display(first, display_id=True).update
        return
    from rich.live import Live
    with Live(first, console=console, refresh_per_second=1) as live:
        yield live.update


# ---- list, logs ------------------------------------------------------------------------------------
def runs(everything: bool = False) -> tuple[list[Status], int]:
    """`trainctl list`: the runs started here (and under ./runs), most recent first, each once; and how many runs
    that never trained (failed on a config error) were left out (none with `everything`)."""
    seen, rows, hidden = set(), [], 0
    for run_dir in known_runs() + local_runs():
        if run_dir in seen:
            continue
        seen.add(run_dir)
        if not everything and never_trained(run_dir):
            hidden += 1
            continue
        rows.append(gather(run_dir))
    return rows, hidden


def log_file(run_dir: Path, supervisor: bool = False) -> Path:
    """The worker's console output (all attempts), or the detached supervisor's: logs/worker.log, logs/supervisor.log."""
    path = run_dir / LOG_DIR / (SUPERVISOR_LOG if supervisor else WORKER_LOG)
    if not path.exists():
        raise Refused(f"{path} does not exist yet")
    return path
