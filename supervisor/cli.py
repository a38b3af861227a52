"""`trainctl`: start, status, resume, stop, logs, list, demo, service. Never imports torch.

Exit codes: 0 ok · 1 the run failed · 2 usage error · 3 bad config or data · 4 run not found ·
5 refused: the run is running · 6 refused: the run's state does not allow it · 7 timed out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from trainctl.worker import fsio
from trainctl.worker.config import ConfigError, load, to_toml
from trainctl.worker.folders import scan
from trainctl.worker.protocol import CONFIG_FILE, LOG_DIR, SUPERVISOR_LOG, WORKER_LOG, committed_checkpoints, read_heartbeat

from . import runstate
from .runs import RunNotFound, known_runs, local_runs, remember, resolve
from .status import gather, is_run_dir
from .supervise import EXIT_GAVE_UP

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BAD_CONFIG = 0, 1, 2, 3
EXIT_NOT_FOUND, EXIT_RUNNING, EXIT_REFUSED, EXIT_TIMEOUT = 4, 5, 6, 7
BOOT_WAIT_SECONDS = 120.0

console = Console()
err = Console(stderr=True)


class Refused(Exception):
    """A command that cannot be carried out; args = (message, exit code)."""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_BAD_CONFIG
    except RunNotFound as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_NOT_FOUND
    except runstate.AlreadyRunning as e:
        err.print(f"[red]refused:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_RUNNING
    except Refused as e:
        err.print(f"[red]refused:[/] {escape(e.args[0])}", highlight=False, soft_wrap=True)
        return e.args[1]
    except KeyboardInterrupt:
        return 130


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
    s.add_argument("--profile", type=int, help="start on this rung of the ladder (1 = first)")
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
    from .service_cmd import add_service_parser
    add_service_parser(sub)
    return p


# ---- start / resume --------------------------------------------------------------------------------
def cmd_start(args) -> int:
    cfg = load(args.config)
    check_data(cfg)
    run_dir = cfg.run_dir
    check_can_start(run_dir)
    freeze(run_dir, cfg)
    return launch(run_dir, 0, args.foreground)


def check_data(cfg) -> None:
    """Data folders checked now, in one clear line, rather than by the worker later."""
    train = scan(cfg.data.train_dir, cfg.data.extensions)
    if cfg.data.val_dir:
        scan(cfg.data.val_dir, cfg.data.extensions, "[data] val_dir", train.classes)
    if len(train) < cfg.train.effective_batch_size:
        raise ConfigError(f"[data] train_dir has {len(train)} images, fewer than one [train] effective_batch_size "
                          f"({cfg.train.effective_batch_size}). Fix: add images or lower effective_batch_size.")


def check_can_start(run_dir: Path) -> None:
    if not run_dir.exists():
        return
    if not is_run_dir(run_dir):
        if any(run_dir.iterdir()):
            raise Refused(f"{run_dir} exists and is not a trainctl run. Fix: choose another [run] name or runs_dir.",
                          EXIT_REFUSED)
        return
    if runstate.supervisor_alive(run_dir):
        raise Refused(f"run {run_dir.name} is already running. See: trainctl status {run_dir.name}", EXIT_RUNNING)
    state = (runstate.read_state(run_dir) or {}).get("state")
    if state == "succeeded":
        raise Refused(f"run {run_dir.name} already succeeded ({run_dir}/model.safetensors). Fix: give the new run "
                      f"another [run] name, or move the old folder away.", EXIT_REFUSED)
    ckpts = committed_checkpoints(run_dir / "checkpoints")
    if ckpts:
        raise Refused(f"{run_dir} holds an unfinished run (newest checkpoint: step {ckpts[-1].step}). "
                      f"Continue it with: trainctl resume {run_dir.name} — or choose another [run] name.", EXIT_REFUSED)
    # Never trained (e.g. it failed on a config error): nothing to lose, start it afresh.


def freeze(run_dir: Path, cfg) -> None:
    """Create the run folder with its frozen config, and remember it."""
    (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    fsio.atomic_write(run_dir / CONFIG_FILE, to_toml(cfg))
    remember(run_dir)


def cmd_resume(args) -> int:
    run_dir = resolve(args.run)
    if runstate.supervisor_alive(run_dir):
        raise Refused(f"run {run_dir.name} is running; nothing to resume. See: trainctl status {run_dir.name}",
                      EXIT_RUNNING)
    if (runstate.read_state(run_dir) or {}).get("state") == "succeeded":
        raise Refused(f"run {run_dir.name} already succeeded: {run_dir}/model.safetensors", EXIT_REFUSED)
    cfg = load(args.config if args.config else run_dir / CONFIG_FILE)
    if args.config:
        if cfg.run_dir.resolve() != run_dir.resolve():
            raise ConfigError(f"{args.config} describes run {cfg.run_dir}, not {run_dir}. Fix: keep [run] name and "
                              f"runs_dir as they were.")
        freeze(run_dir, cfg)
    profile = None
    if args.profile is not None:
        if not 1 <= args.profile <= len(cfg.profiles):
            raise Refused(f"--profile {args.profile}: the ladder has rungs 1..{len(cfg.profiles)}", EXIT_USAGE)
        profile = args.profile - 1
    remember(run_dir)
    return launch(run_dir, profile, args.foreground)


def launch(run_dir: Path, profile: int | None, foreground: bool) -> int:
    if foreground:
        from .foreground import run_foreground
        code = run_foreground(run_dir, profile, console)
        return EXIT_FAILED if code == EXIT_GAVE_UP else code
    return start_detached(run_dir, profile)


def start_detached(run_dir: Path, profile: int | None) -> int:
    """Start the supervisor in its own session; return once it is up and its worker got past loading."""
    cmd = [sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    (run_dir / LOG_DIR).mkdir(exist_ok=True)
    with open(run_dir / LOG_DIR / SUPERVISOR_LOG, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + BOOT_WAIT_SECONDS
    with console.status("starting the supervisor and the worker (imports, model, sanity check)..."):
        while time.monotonic() < deadline:
            rc = proc.poll()
            state = runstate.read_state(run_dir) or {}
            mine = state.get("supervisor_pid") == proc.pid
            if rc is not None and not (mine and state.get("state") in ("stopped", "succeeded", "failed")):
                tail = (run_dir / LOG_DIR / SUPERVISOR_LOG).read_text(errors="replace").strip().splitlines()[-3:]
                raise Refused("the supervisor did not start: " + " | ".join(tail), EXIT_RUNNING if rc == 2 else EXIT_FAILED)
            if mine and state.get("state") == "failed":
                reason = state.get("reason") or "unknown"
                err.print(f"[red]error:[/] {escape(reason.removeprefix('config_error: '))}", highlight=False,
                          soft_wrap=True)
                return EXIT_BAD_CONFIG if reason.startswith("config_error") else EXIT_FAILED
            hb = read_heartbeat(run_dir) or {}
            booted = hb.get("attempt") == state.get("attempt") and hb.get("phase") not in (None, "booting", "loading")
            if mine and (booted or state.get("state") in ("running", "backoff", "succeeded", "stopped")):
                break
            time.sleep(0.2)
    name = escape(run_dir.name)
    console.print(f"[green]started[/] run [bold]{name}[/] — supervisor pid {proc.pid}\n"
                  f"  folder:  {escape(str(run_dir))}\n  status:  trainctl status {name}\n"
                  f"  logs:    trainctl logs {name} -f\n  stop:    trainctl stop {name}", highlight=False)
    return EXIT_OK


# ---- status, stop, logs, list ----------------------------------------------------------------------
def cmd_status(args) -> int:
    run_dir = resolve(args.run)
    if args.json:
        st = gather(run_dir)
        st.pop("metrics", None)
        print(json.dumps(st, indent=1))
        return EXIT_OK
    from .view import render_status
    if not args.watch:
        console.print(render_status(gather(run_dir)))
        return EXIT_OK
    from rich.live import Live
    with Live(render_status(gather(run_dir)), console=console, refresh_per_second=1) as live:
        while True:
            st = gather(run_dir)
            live.update(render_status(st))
            if not st["supervisor_alive"]:
                return EXIT_OK
            time.sleep(2)


def cmd_stop(args) -> int:
    run_dir = resolve(args.run)
    state = runstate.read_state(run_dir) or {}
    if not runstate.supervisor_alive(run_dir):
        raise Refused(f"run {run_dir.name} is not running (state: {gather(run_dir)['state']}); nothing to stop.",
                      EXIT_REFUSED)
    cfg = load(run_dir / CONFIG_FILE)
    timeout = args.timeout if args.timeout is not None else cfg.supervisor.stop_timeout_seconds + 30
    os.kill(int(state["supervisor_pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with console.status(f"stopping {run_dir.name}: the worker finishes its step and checkpoints..."):
        while runstate.supervisor_alive(run_dir):
            if time.monotonic() > deadline:
                err.print(f"[red]timeout:[/] {escape(run_dir.name)} has not stopped after {timeout:.0f} s; it is still "
                          f"stopping (see: trainctl logs {run_dir.name}). Run stop again to keep waiting.")
                return EXIT_TIMEOUT
            time.sleep(0.2)
    st = gather(run_dir)
    ck = st["last_checkpoint"]
    console.print(f"[magenta]stopped[/] {escape(run_dir.name)} at step {st['step']}"
                  + (f" (checkpoint at step {ck['step']})" if ck else "")
                  + f". Resume with: trainctl resume {run_dir.name}", highlight=False)
    return EXIT_OK


def cmd_logs(args) -> int:
    run_dir = resolve(args.run)
    path = run_dir / LOG_DIR / (SUPERVISOR_LOG if args.supervisor else WORKER_LOG)
    if not path.exists():
        raise Refused(f"{path} does not exist yet", EXIT_REFUSED)
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
    return EXIT_OK


def cmd_list(args) -> int:
    seen, rows = set(), []
    for run_dir in known_runs() + local_runs():
        if run_dir not in seen:
            seen.add(run_dir)
            rows.append(gather(run_dir))
    if not rows:
        console.print("no runs yet. Start one with: trainctl start --config FILE   (or: trainctl demo)")
        return EXIT_OK
    from .view import render_list
    console.print(render_list(rows))
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.dir, args.fast, console)
