"""Starting a run: check its data, check that it may start, freeze its config, launch its supervisor.

Shared by `trainctl start`, `resume`, `demo` and `service install`; the supervisor runs here in the
foreground, or detached in its own session.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from rich.markup import escape

from trainctl.contract import fsio
from trainctl.contract.config import Config, ConfigError, to_toml
from trainctl.contract.folders import scan
from trainctl.contract.lifecycle import State, is_final
from trainctl.contract.protocol import ExitCode, read_heartbeat
from trainctl.contract.runfolder import CONFIG_FILE, LOG_DIR, MODEL_FILE, SUPERVISOR_LOG, newest_checkpoint

from . import runstate
from .runs import remember
from .status import is_run_dir
from .terminal import console, error

BOOT_WAIT_SECONDS = 120.0


class Refused(Exception):
    """A command that cannot be carried out; args = (message, exit code)."""


def check_data(cfg: Config) -> None:
    """Data folders checked now, in one clear line, rather than by the worker later."""
    train = scan(cfg.data.train_dir, cfg.data.extensions)
    if cfg.data.val_dir:
        scan(cfg.data.val_dir, cfg.data.extensions, "[data] val_dir", train.classes)
    if len(train) < cfg.train.effective_batch_size:
        raise ConfigError(f"[data] train_dir has {len(train)} images, fewer than one [train] effective_batch_size "
                          f"({cfg.train.effective_batch_size}). Fix: add images or lower effective_batch_size.")


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
        raise Refused(f"run {run_dir.name} is already running. See: trainctl status {run_dir.name}", ExitCode.RUNNING)
    saved = runstate.read_state(run_dir)
    if saved and saved.state is State.SUCCEEDED:
        raise Refused(f"run {run_dir.name} already succeeded ({run_dir / MODEL_FILE}). Fix: give the new run "
                      f"another [run] name, or move the old folder away.", ExitCode.REFUSED)
    newest = newest_checkpoint(run_dir)
    if newest:
        raise Refused(f"{run_dir} holds an unfinished run (newest checkpoint: step {newest.step}). "
                      f"Continue it with: trainctl resume {run_dir.name} — or choose another [run] name.",
                      ExitCode.REFUSED)
    # Never trained (e.g. it failed on a config error): nothing to lose, start it afresh.


def freeze(run_dir: Path, cfg: Config) -> None:
    """Create the run folder with its frozen config, and remember it."""
    (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    fsio.atomic_write(run_dir / CONFIG_FILE, to_toml(cfg))
    remember(run_dir)


def launch(run_dir: Path, rung_index: int | None, foreground: bool, fresh_budget: bool = False) -> int:
    """Supervise the run here (foreground) or start a detached supervisor; return the exit code."""
    if foreground:
        from .foreground import run_foreground
        return run_foreground(run_dir, rung_index, console, fresh_budget)
    return start_detached(run_dir, rung_index, fresh_budget)


def start_detached(run_dir: Path, rung_index: int | None, fresh_budget: bool = False) -> int:
    """Start the supervisor in its own session; return once it is up and its worker passed its sanity check."""
    cmd = [sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)]
    if rung_index is not None:
        cmd += ["--rung", str(rung_index + 1)]
    if fresh_budget:
        cmd.append("--fresh-budget")
    (run_dir / LOG_DIR).mkdir(exist_ok=True)
    with open(run_dir / LOG_DIR / SUPERVISOR_LOG, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + BOOT_WAIT_SECONDS
    with console.status("starting the supervisor and the worker (imports, model, sanity check)..."):
        while time.monotonic() < deadline:
            rc = proc.poll()
            saved = runstate.read_state(run_dir)
            mine = saved is not None and saved.supervisor_pid == proc.pid
            if rc is not None and not (mine and is_final(saved.state)):
                tail = (run_dir / LOG_DIR / SUPERVISOR_LOG).read_text(errors="replace").strip().splitlines()[-3:]
                raise Refused("the supervisor did not start: " + " | ".join(tail),
                              rc if rc in (ExitCode.RUNNING, ExitCode.BAD_CONFIG) else ExitCode.FAILED)
            if mine and saved.state is State.FAILED:
                reason = saved.reason or "unknown"
                error("error", reason.removeprefix("config_error: "))
                return ExitCode.BAD_CONFIG if reason.startswith("config_error") else ExitCode.FAILED
            hb = read_heartbeat(run_dir)
            booted = hb is not None and mine and hb.attempt == saved.attempt and hb.phase.booted
            if mine and (booted or saved.state in (State.RUNNING, State.BACKOFF) or is_final(saved.state)):
                break
            time.sleep(0.2)
    name = escape(run_dir.name)
    console.print(f"[green]started[/] run [bold]{name}[/] — supervisor pid {proc.pid}\n"
                  f"  folder:  {escape(str(run_dir))}\n  status:  trainctl status {name}\n"
                  f"  logs:    trainctl logs {name} -f\n  stop:    trainctl stop {name}", highlight=False)
    return ExitCode.OK
