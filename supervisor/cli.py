"""`trainctl`: start, status, resume, stop, logs, list, demo, service. Never imports torch.

Exit codes: the one table in `trainctl.contract.protocol.ExitCode` (and the README).
"""
from __future__ import annotations

import argparse
import errno
import importlib.metadata
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from rich.markup import escape

from trainctl.contract.config import ConfigError, SupervisorSection, load, resume_changes
from trainctl.contract.lifecycle import State
from trainctl.contract.names import check_new_run, shell_run
from trainctl.contract.protocol import ExitCode
from trainctl.contract.runfolder import (CONFIG_FILE, LOG_DIR, MODEL_FILE, SUPERVISOR_LOG, WORKER_LOG, newest_checkpoint,
                                         set_aside_all)

from . import journal, runstate
from .launch import (Refused, check_can_start, check_data, clear_history, freeze, launch, preflight, running,
                     starting)
from .runs import AmbiguousRun, RunNotFound, known_runs, local_runs, never_trained, remember, resolve
from .service_cmd import add_service_parser
from .status import gather
from .terminal import console, error, silence
from .waiting import wait_for


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # a full disk, a quota, a file size limit


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "foreground", False) or args.command == "demo":
        # A closed terminal (SIGHUP) must not end a run it started: the supervisor ignores it too, once it runs.
        signal.signal(signal.SIGHUP, lambda *_: None)
    try:
        return args.func(args)
    except ConfigError as e:
        error("error", str(e))
        return ExitCode.BAD_CONFIG
    except RunNotFound as e:
        error("error", str(e))
        return ExitCode.NOT_FOUND
    except AmbiguousRun as e:
        error("error", str(e))
        return ExitCode.USAGE
    except runstate.AlreadyRunning as e:
        error("refused", str(e))
        return ExitCode.RUNNING
    except Refused as e:
        error("refused", e.args[0])
        return e.args[1]
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:   # `trainctl logs RUN | head`: the reader has all it wanted
        silence(sys.stdout)
        return ExitCode.OK
    except Exception as e:   # noqa: BLE001 — a bug of ours: not "the run failed" (1), which services never restart
        if isinstance(e, OSError) and e.errno in NO_SPACE:   # a full disk, whoever filled it: one line
            error("error", f"cannot write {e.filename or 'a file'}: {e.strerror}. Fix: free some disk space "
                           f"(df -h), then run the command again; the run's checkpoints are untouched.")
            return ExitCode.REFUSED
        error("internal error", f"a bug in trainctl, not in your run; please report it with this traceback:\n"
                                f"{traceback.format_exc().rstrip()}")
        return ExitCode.INTERNAL_ERROR


# The CLI's exit codes, for `trainctl --help` (the full table, the worker's too: README 'Exit codes').
EXIT_CODES = {
    ExitCode.OK: "ok: succeeded, stopped on request, or nothing to do",
    ExitCode.FAILED: "the run failed: the policy gave up (the reason is in trainctl status)",
    ExitCode.USAGE: "usage error: a bad command line, or a run name shared by two runs",
    ExitCode.BAD_CONFIG: "bad config or data",
    ExitCode.NOT_FOUND: "run not found",
    ExitCode.RUNNING: "refused: the run is already running (another supervisor holds it)",
    ExitCode.REFUSED: "refused: the run's state does not allow it (or the service manager refused)",
    ExitCode.TIMEOUT: "timed out waiting",
    ExitCode.INTERNAL_ERROR: "internal error: a bug in trainctl, not in your run",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}
RUN_HELP = "run name or run folder"


def version() -> str:
    try:
        return importlib.metadata.version("trainctl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {int(code):>3}  {text}" for code, text in EXIT_CODES.items())
    p = argparse.ArgumentParser(prog="trainctl", description="Supervised timm training that survives crashes.",
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"trainctl {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="one of these (trainctl COMMAND --help says more)")

    def command(name: str, summary: str, description: str):
        return sub.add_parser(name, help=summary, description=description)
    s = command("start", "start a new run from a config file",
                "Check the config, the data, the model and the devices, create the run folder <runs_dir>/<name> "
                "with a frozen copy of the config, and start its supervisor (detached: returns once the worker is "
                "training).")
    s.add_argument("--config", required=True, type=Path, help="the run's TOML config")
    s.add_argument("--foreground", action="store_true", help="stay attached with a live display (services use this)")
    s.set_defaults(func=cmd_start)
    s = command("status", "what a run is doing, or what happened to it",
                "What a run is doing, or what happened to it, from its folder alone (supervisor alive or not).")
    s.add_argument("run", nargs="?", help=f"{RUN_HELP} (default: the most recent run)")
    s.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    s.add_argument("--watch", action="store_true", help="refresh until the run ends (Ctrl-C to leave)")
    s.set_defaults(func=cmd_status)
    s = command("resume", "continue a stopped, failed or orphaned run from its newest checkpoint",
                "Continue a stopped, failed or orphaned run from its newest checkpoint, with a fresh restart budget. "
                "--config applies an edited config: the ladder, [supervisor], [checkpoint], [data] val_dir, logging "
                "and threads may change; the settings the checkpoints depend on (model, data, seed, batch, epochs "
                "and the learning-rate schedule) may not.")
    s.add_argument("run", help=RUN_HELP)
    s.add_argument("--rung", type=int, help="start on this rung of the ladder (1 = first)")
    s.add_argument("--profile", dest="rung", type=int, help=argparse.SUPPRESS)   # its name before 0.2
    s.add_argument("--config", type=Path, help="apply this edited config first (checked before anything is written)")
    s.add_argument("--foreground", action="store_true", help="stay attached with a live display instead of detaching")
    s.add_argument("--from-scratch", action="store_true",
                   help="start over from step 0: every checkpoint file of the run is moved into "
                        "checkpoints/set-aside-<time>/ first (nothing is deleted)")
    s.set_defaults(func=cmd_resume)
    s = command("stop", "checkpoint at the current step and stop",
                "Ask the supervisor to stop: the worker finishes its optimizer step, writes a checkpoint and exits. "
                "Continue later with: trainctl resume RUN.")
    s.add_argument("run", help=RUN_HELP)
    s.add_argument("--timeout", type=float, default=None, help="seconds to wait (default: the run's stop timeout + 30)")
    s.set_defaults(func=cmd_stop)
    s = command("logs", "the worker's console output", "Print the worker's console output (all attempts), "
                "or the detached supervisor's.")
    s.add_argument("run", nargs="?", help=f"{RUN_HELP} (default: the most recent run)")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the supervisor exits")
    s.add_argument("--supervisor", action="store_true", help="the supervisor's log instead")
    s.set_defaults(func=cmd_logs)
    s = command("list", "runs with state, progress and age",
                "Runs started on this machine (and under ./runs), most recent first. Runs that never trained "
                "because of a config error are left out unless --all.")
    s.add_argument("--json", action="store_true", help="a JSON array of the runs' status objects, for scripts")
    s.add_argument("--all", action="store_true", help="also the runs that never trained (failed on a config error)")
    s.set_defaults(func=cmd_list)
    s = command("demo", "train a tiny model on synthetic images, crash it on purpose, watch it recover",
                "Write a small synthetic dataset, train a tiny timm model on the CPU in the foreground, kill its "
                "worker with SIGKILL halfway, and watch the supervisor recover from the last checkpoint.")
    s.add_argument("--dir", type=Path, default=Path("trainctl-demo"), help="where the data and the run go")
    s.add_argument("--fast", action="store_true", help="a shorter demo (what the tests run)")
    s.set_defaults(func=cmd_demo)
    add_service_parser(sub)
    return p


# ---- start / resume --------------------------------------------------------------------------------
def cmd_start(args) -> int:
    """Check all that can be checked, then create the run folder and start: a refused start writes nothing."""
    cfg = load(args.config)
    check_new_run(cfg)
    check_data(cfg)
    run_dir = cfg.run_dir
    check_can_start(run_dir)
    preflight(args.config)
    with starting(run_dir) as start_lock:   # a racing start of the same run: only the winner freezes its config
        check_can_start(run_dir)
        clear_history(run_dir)
        freeze(run_dir, cfg)
        return launch(run_dir, None, args.foreground, start_lock=start_lock)


def cmd_resume(args) -> int:
    """Continue a run by hand: from its newest checkpoint, with a fresh restart budget (said and journaled).

    An edited config is checked against the run's checkpoints before anything is written: a refused resume
    leaves the run as it was.
    """
    run_dir = resolve(args.run)
    if runstate.supervisor_alive(run_dir):
        raise Refused(f"{running(run_dir)}; nothing to resume. See: trainctl status {shell_run(run_dir)}", ExitCode.RUNNING)
    saved = runstate.read_state(run_dir)
    if saved and saved.state is State.SUCCEEDED:
        raise Refused(f"run {run_dir.name} already succeeded: {run_dir / MODEL_FILE}", ExitCode.REFUSED)
    cfg = load(run_dir / CONFIG_FILE)
    newest = newest_checkpoint(run_dir)
    if args.config:
        cfg = check_edited(args.config, cfg, run_dir, newest)
    if args.rung is not None and not 1 <= args.rung <= len(cfg.profiles):
        raise Refused(f"--rung {args.rung}: the ladder has rungs 1..{len(cfg.profiles)}", ExitCode.USAGE)
    if args.config:
        preflight(args.config)
        freeze(run_dir, cfg)
    remember(run_dir)
    if (said := journal.check(run_dir)) is not None:   # a damaged journal: set aside, a fresh one, said once
        error("warning", said)
    where = (f"from step {newest.step} (checkpoint {newest.path})" if newest
             else "from the start (no checkpoint yet)")
    if args.from_scratch:   # a person's decision, e.g. after "no checkpoint verifies": nothing is deleted
        where = start_over(run_dir)
    return launch(run_dir, None if args.rung is None else args.rung - 1, args.foreground, fresh_budget=True,
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
    try:
        stop_timeout = load(run_dir / CONFIG_FILE).supervisor.stop_timeout_seconds
    except ConfigError:   # a frozen value an older version allowed and this one refuses: a stop must still work
        stop_timeout = SupervisorSection().stop_timeout_seconds
    timeout = args.timeout if args.timeout is not None else stop_timeout + 30
    os.kill(saved.supervisor_pid, signal.SIGTERM)
    with console.status(f"stopping {run_dir.name}: the worker finishes its step and checkpoints..."):
        try:
            wait_for(lambda: not runstate.supervisor_alive(run_dir), timeout, 0.2)
        except TimeoutError:
            error("timeout", f"{run_dir.name} has not stopped after {timeout:.0f} s; it is still stopping "
                             f"(see: trainctl logs {shell_run(run_dir)}). Run stop again to keep waiting.")
            return ExitCode.TIMEOUT
    st = gather(run_dir)
    ck = st.last_checkpoint
    console.print(f"[magenta]stopped[/] {escape(run_dir.name)} at step {st.step}"
                  + (f" (checkpoint at step {ck.step})" if ck else "")
                  + f". Resume with: trainctl resume {escape(shell_run(run_dir))}", highlight=False, soft_wrap=True)
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
    seen, rows, hidden = set(), [], 0
    for run_dir in known_runs() + local_runs():
        if run_dir in seen:
            continue
        seen.add(run_dir)
        if not args.all and never_trained(run_dir):
            hidden += 1
            continue
        rows.append(gather(run_dir))
    if args.json:
        print(json.dumps([st.to_json() for st in rows], indent=1))
        return ExitCode.OK
    if not rows:
        console.print("no runs yet. Start one with: trainctl start --config FILE   (or: trainctl demo)"
                      if not hidden else "no runs to show.")
    else:
        from .view import render_list
        console.print(render_list(rows))
    if hidden:
        console.print(f"[dim]{hidden} run(s) that never trained (failed on a config error) not shown: "
                      f"trainctl list --all[/]", highlight=False)
    return ExitCode.OK


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.dir, args.fast, console)
