"""`trainctl`: start, status, resume, stop, logs, list, demo, service. Never imports torch.

Exit codes: the one table in `trainctl.contract.protocol.ExitCode` (and the README).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from rich.markup import escape

from trainctl.contract.config import ConfigError, load
from trainctl.contract.lifecycle import State
from trainctl.contract.protocol import ExitCode
from trainctl.contract.runfolder import CONFIG_FILE, LOG_DIR, MODEL_FILE, SUPERVISOR_LOG, WORKER_LOG

from . import runstate
from .launch import Refused, check_can_start, check_data, freeze, launch
from .runs import RunNotFound, known_runs, local_runs, remember, resolve
from .service_cmd import add_service_parser
from .status import gather
from .terminal import console, error
from .waiting import wait_for


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        error("error", str(e))
        return ExitCode.BAD_CONFIG
    except RunNotFound as e:
        error("error", str(e))
        return ExitCode.NOT_FOUND
    except runstate.AlreadyRunning as e:
        error("refused", str(e))
        return ExitCode.RUNNING
    except Refused as e:
        error("refused", e.args[0])
        return e.args[1]
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception:   # noqa: BLE001 — a bug of ours: not "the run failed" (1), which services never restart
        error("internal error", f"a bug in trainctl, not in your run; please report it with this traceback:\n"
                                f"{traceback.format_exc().rstrip()}")
        return ExitCode.INTERNAL_ERROR


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainctl", description="Supervised timm training that survives crashes.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("start", help="start a new run from a config file")
    s.add_argument("--config", required=True, type=Path, help="the run's TOML config")
    s.add_argument("--foreground", action="store_true", help="stay attached with a live display (services use this)")
    s.set_defaults(func=cmd_start)
    s = sub.add_parser("status", help="what a run is doing, or what happened to it")
    s.add_argument("run", nargs="?", help="run name or run folder (default: the most recent run)")
    s.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    s.add_argument("--watch", action="store_true", help="refresh until the run ends (Ctrl-C to leave)")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("resume", help="continue a stopped, failed or orphaned run from its newest checkpoint")
    s.add_argument("run")
    s.add_argument("--rung", type=int, help="start on this rung of the ladder (1 = first)")
    s.add_argument("--profile", dest="rung", type=int, help=argparse.SUPPRESS)   # its name before 0.2
    s.add_argument("--config", type=Path, help="apply this edited config (same model, data and batch) first")
    s.add_argument("--foreground", action="store_true")
    s.set_defaults(func=cmd_resume)
    s = sub.add_parser("stop", help="checkpoint at the current step and stop")
    s.add_argument("run")
    s.add_argument("--timeout", type=float, default=None, help="seconds to wait (default: the run's stop timeout + 30)")
    s.set_defaults(func=cmd_stop)
    s = sub.add_parser("logs", help="the worker's console output")
    s.add_argument("run", nargs="?")
    s.add_argument("-f", "--follow", action="store_true")
    s.add_argument("--supervisor", action="store_true", help="the supervisor's log instead")
    s.set_defaults(func=cmd_logs)
    s = sub.add_parser("list", help="runs with state, progress and age")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("demo", help="train a tiny model on synthetic images, crash it on purpose, watch it recover")
    s.add_argument("--dir", type=Path, default=Path("trainctl-demo"), help="where the data and the run go")
    s.add_argument("--fast", action="store_true", help="a shorter demo (what the tests run)")
    s.set_defaults(func=cmd_demo)
    add_service_parser(sub)
    return p


# ---- start / resume --------------------------------------------------------------------------------
def cmd_start(args) -> int:
    cfg = load(args.config)
    check_data(cfg)
    run_dir = cfg.run_dir
    check_can_start(run_dir)
    freeze(run_dir, cfg)
    return launch(run_dir, None, args.foreground)


def cmd_resume(args) -> int:
    """Continue a run by hand: from its newest checkpoint, with a fresh restart budget (said and journaled)."""
    run_dir = resolve(args.run)
    if runstate.supervisor_alive(run_dir):
        raise Refused(f"run {run_dir.name} is running; nothing to resume. See: trainctl status {run_dir.name}",
                      ExitCode.RUNNING)
    saved = runstate.read_state(run_dir)
    if saved and saved.state is State.SUCCEEDED:
        raise Refused(f"run {run_dir.name} already succeeded: {run_dir / MODEL_FILE}", ExitCode.REFUSED)
    cfg = load(args.config if args.config else run_dir / CONFIG_FILE)
    if args.config:
        if cfg.run_dir.resolve() != run_dir.resolve():
            raise ConfigError(f"{args.config} describes run {cfg.run_dir}, not {run_dir}. Fix: keep [run] name and "
                              f"runs_dir as they were.")
        freeze(run_dir, cfg)
    if args.rung is not None and not 1 <= args.rung <= len(cfg.profiles):
        raise Refused(f"--rung {args.rung}: the ladder has rungs 1..{len(cfg.profiles)}", ExitCode.USAGE)
    remember(run_dir)
    return launch(run_dir, None if args.rung is None else args.rung - 1, args.foreground, fresh_budget=True)


# ---- status, stop, logs, list ----------------------------------------------------------------------
def cmd_status(args) -> int:
    run_dir = resolve(args.run)
    if args.json:
        print(json.dumps(gather(run_dir).to_json(), indent=1))
        return ExitCode.OK
    from .view import render_status
    if not args.watch:
        console.print(render_status(gather(run_dir)))
        return ExitCode.OK
    from rich.live import Live
    with Live(render_status(gather(run_dir)), console=console, refresh_per_second=1) as live:
        while True:
            st = gather(run_dir)
            live.update(render_status(st))
            if not st.supervisor_alive:
                return ExitCode.OK
            time.sleep(2)


def cmd_stop(args) -> int:
    run_dir = resolve(args.run)
    saved = runstate.read_state(run_dir)
    if not runstate.supervisor_alive(run_dir) or saved is None or saved.supervisor_pid is None:
        raise Refused(f"run {run_dir.name} is not running (state: {gather(run_dir).state}); nothing to stop.",
                      ExitCode.REFUSED)
    cfg = load(run_dir / CONFIG_FILE)
    timeout = args.timeout if args.timeout is not None else cfg.supervisor.stop_timeout_seconds + 30
    os.kill(saved.supervisor_pid, signal.SIGTERM)
    with console.status(f"stopping {run_dir.name}: the worker finishes its step and checkpoints..."):
        try:
            wait_for(lambda: not runstate.supervisor_alive(run_dir), timeout, 0.2)
        except TimeoutError:
            error("timeout", f"{run_dir.name} has not stopped after {timeout:.0f} s; it is still stopping "
                             f"(see: trainctl logs {run_dir.name}). Run stop again to keep waiting.")
            return ExitCode.TIMEOUT
    st = gather(run_dir)
    ck = st.last_checkpoint
    console.print(f"[magenta]stopped[/] {escape(run_dir.name)} at step {st.step}"
                  + (f" (checkpoint at step {ck.step})" if ck else "")
                  + f". Resume with: trainctl resume {run_dir.name}", highlight=False)
    return ExitCode.OK


def cmd_logs(args) -> int:
    run_dir = resolve(args.run)
    path = run_dir / LOG_DIR / (SUPERVISOR_LOG if args.supervisor else WORKER_LOG)
    if not path.exists():
        raise Refused(f"{path} does not exist yet", ExitCode.REFUSED)
    with open(path, "rb") as f:
        sys.stdout.write(f.read().decode("utf-8", "replace"))
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
            elif not runstate.supervisor_alive(run_dir):
                break
            else:
                time.sleep(0.5)
    return ExitCode.OK


def cmd_list(args) -> int:
    seen, rows = set(), []
    for run_dir in known_runs() + local_runs():
        if run_dir not in seen:
            seen.add(run_dir)
            rows.append(gather(run_dir))
    if not rows:
        console.print("no runs yet. Start one with: trainctl start --config FILE   (or: trainctl demo)")
        return ExitCode.OK
    from .view import render_list
    console.print(render_list(rows))
    return ExitCode.OK


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.dir, args.fast, console)
