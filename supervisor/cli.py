"""`trainctl`: start, status, resume, stop, logs, list, demo, service. Never imports torch.

A thin layer over `control` (what each command does, shared with the Python API `trainctl`): parse the
arguments, call it, print. Its errors (`errors`) become one line on stderr and their exit code: the one
table in `trainctl.contract.protocol.ExitCode` (and the README).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import signal
import sys
import time
import traceback
from pathlib import Path

from rich.markup import escape

from trainctl.contract.names import shell_run
from trainctl.contract.protocol import ExitCode

from . import control, runstate
from .control import NO_SPACE
from .errors import Error, Refused
from .runs import resolve
from .service_cmd import add_service_parser
from .status import gather
from .terminal import console, error, silence


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "foreground", False) or args.command == "demo":
        # A closed terminal (SIGHUP) must not end a run it started: the supervisor ignores it too, once it runs.
        signal.signal(signal.SIGHUP, lambda *_: None)
    try:
        with control.translated():   # the commands' own errors: a person's mistake or a refusal, in one line
            return args.func(args)
    except Error as e:
        error(e.label, str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:   # `trainctl logs RUN | head`: the reader has all it wanted
        silence(sys.stdout)
        return ExitCode.OK
    except Exception:   # noqa: BLE001 — a bug of ours: not "the run failed" (1), which services never restart
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
    ExitCode.REFUSED: "refused: the run's state does not allow it (or the service manager refused, or an optional "
                      "extra the command needs is not installed)",
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
    s.add_argument("--rung", type=int, help="start on this rung of the ladder (1 = first; default: the first, or "
                                            "lower where this machine's rung memory says so)")
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
    s = command("plot", "draw the run as a PNG: loss, accuracy, lr, images/s, crashes, re-done steps, time",
                "Draw one figure of a run (running or ended) from its folder: training loss and validation accuracy "
                "over the optimizer steps, the learning rate, images/s and the supervised wall-clock time, with "
                "every crash marked by its kind, the steps re-done after each crash shaded, and rung changes. "
                "Needs matplotlib: pip install \"trainctl[plot]\".")
    s.add_argument("run", nargs="?", help=f"{RUN_HELP} (default: the most recent run)")
    s.add_argument("-o", "--output", type=Path, help="the PNG to write (default: RUN.png in the current folder)")
    s.set_defaults(func=cmd_plot)
    add_service_parser(sub)
    return p


# ---- start / resume --------------------------------------------------------------------------------
def cmd_start(args) -> int:
    """Check all that can be checked, then create the run folder and start: a refused start writes nothing."""
    return control.start(args.config, args.foreground, args.rung)[1]


def cmd_resume(args) -> int:
    """Continue a run by hand: from its newest checkpoint, with a fresh restart budget (said and journaled)."""
    return control.resume(resolve(args.run), args.rung, args.config, args.foreground, args.from_scratch)


# ---- status, stop, logs, list ----------------------------------------------------------------------
def cmd_status(args) -> int:
    run_dir = resolve(args.run)
    if args.json:
        print(json.dumps(gather(run_dir).to_json(), indent=1))
        return ExitCode.OK
    if args.watch:
        control.watch(run_dir)
        return ExitCode.OK
    from .view import render_status
    console.print(render_status(gather(run_dir)))
    return ExitCode.OK


def cmd_stop(args) -> int:
    run_dir = resolve(args.run)
    st = control.stop(run_dir, args.timeout)
    ck = st.last_checkpoint
    console.print(f"[magenta]stopped[/] {escape(run_dir.name)} at step {st.step}"
                  + (f" (checkpoint at step {ck.step})" if ck else "")
                  + f". Resume with: trainctl resume {escape(shell_run(run_dir))}", highlight=False, soft_wrap=True)
    return ExitCode.OK


def cmd_logs(args) -> int:
    run_dir = resolve(args.run)
    with open(control.log_file(run_dir, args.supervisor), "rb") as f:
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
    rows, hidden = control.runs(args.all)
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


def cmd_plot(args) -> int:
    """The run's figure as a PNG (plot.py; matplotlib is the optional extra `trainctl[plot]`)."""
    from .plot import INSTALL, PlotUnavailable, headline, plot_data, save_figure
    run_dir = resolve(args.run)
    out = args.output or Path(f"{run_dir.name}.png")
    data = plot_data(run_dir)
    if not data.train:
        raise Refused(f"run {run_dir.name} has logged no training step yet: nothing to draw. Fix: wait for its first "
                      f"logged step ([train] log_every_steps), then run: trainctl plot {shell_run(run_dir)}",
                      ExitCode.REFUSED)
    try:
        save_figure(data, out)
    except PlotUnavailable:
        error("error", f"trainctl plot needs matplotlib, which is not installed. Fix: {INSTALL}")
        return ExitCode.REFUSED
    except OSError as e:
        if e.errno in NO_SPACE:
            raise
        error("error", f"cannot write {out}: {e.strerror or e}. Fix: give -o a file in a folder you can write to.")
        return ExitCode.REFUSED
    console.print(f"wrote {escape(str(out))}: {escape(data.run_name)} {data.state}, {escape(headline(data))}",
                  highlight=False, soft_wrap=True)
    return ExitCode.OK
