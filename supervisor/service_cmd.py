"""`trainctl service install|uninstall|run`: the command-line side of `service`."""
from __future__ import annotations

import shlex
from pathlib import Path

from rich.markup import escape

from trainctl.contract.config import load
from trainctl.contract.lifecycle import State
from trainctl.contract.names import check_new_run, shell_run
from trainctl.contract.protocol import ExitCode
from trainctl.contract.runfolder import CONFIG_FILE

from . import runstate, service
from .foreground import run_foreground
from .launch import Refused, check_can_start, check_data, clear_history, freeze, preflight, running
from .notify import Notifier
from .runs import resolve
from .terminal import console


MANAGER_HELP = "systemd or launchd (default: this platform's: launchd on macOS, systemd elsewhere)"


def add_service_parser(sub) -> None:
    p = sub.add_parser("service", help="run unattended under systemd (Linux) or launchd (macOS)",
                       description="Run a run unattended under systemd (a user unit, Linux) or launchd (a LaunchAgent, "
                                   "macOS): restarted after a crash, resumed after a reboot.")
    ss = p.add_subparsers(dest="service_command", required=True, metavar="ACTION",
                          help="one of these (trainctl service ACTION --help says more)")
    s = ss.add_parser("install", help="write the unit / plist for a run and start it",
                      description="Write the service files for a run (an existing one, or one created from --config) "
                                  "and enable and start the service. --dry-run prints the files and the commands "
                                  "and changes nothing.")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("run", nargs="?", help="an existing run (name or folder)")
    what.add_argument("--config", type=Path, help="create the run from this config (not started by hand)")
    s.add_argument("--dry-run", action="store_true", help="print the files and commands instead, change nothing")
    s.add_argument("--manager", choices=("systemd", "launchd"), default=None, help=MANAGER_HELP)
    s.set_defaults(func=cmd_install)
    s = ss.add_parser("uninstall", help="stop the run's service and remove its files",
                      description="Stop and disable the run's service and remove its files; the run folder stays.")
    s.add_argument("run", help="run name or run folder")
    s.add_argument("--dry-run", action="store_true", help="print the commands and the files to remove, change nothing")
    s.add_argument("--manager", choices=("systemd", "launchd"), default=None, help=MANAGER_HELP)
    s.set_defaults(func=cmd_uninstall)
    s = ss.add_parser("run", help="the service's start command: start, resume, or nothing if finished",
                      description="What systemd and launchd start: a new run starts, an unfinished one resumes from "
                                  "its newest checkpoint, a finished one (succeeded or failed) exits 0 at once.")
    s.add_argument("run", help="run name or run folder")
    s.set_defaults(func=cmd_run)


def cmd_install(args) -> int:
    """Plan from the config in memory; a dry run writes nothing, a failed install leaves nothing behind."""
    manager = args.manager or service.default_manager()
    if args.config:
        cfg = load(args.config)
        check_new_run(cfg)
        check_data(cfg)
        run_dir = cfg.run_dir
        try:
            check_can_start(run_dir)
        except Refused as e:
            if not (args.dry_run and e.args[1] == ExitCode.RUNNING):   # a dry run may look at a running run
                raise
        preflight(args.config)
    else:
        run_dir = resolve(args.run)
        cfg = load(run_dir / CONFIG_FILE)
    files, commands = service.plan_install(run_dir, manager, cfg)
    if args.dry_run:   # plain print: the exact bytes, no terminal formatting
        for path, content in files.items():
            print(f"# would write {path}:\n{content.decode()}")
        for cmd in commands:
            print("# would run: " + shlex.join(cmd))
        return ExitCode.OK
    if runstate.supervisor_alive(run_dir):
        raise Refused(f"{running(run_dir)}, not under a service: the service would start a second supervisor. "
                      f"Fix: trainctl stop {shell_run(run_dir)}, then install (the service resumes it from its checkpoint).",
                      ExitCode.RUNNING)
    try:
        service.check_available(manager)
        if args.config:
            clear_history(run_dir)
            freeze(run_dir, cfg)
        service.install(run_dir, manager, files, commands)
    except service.ServiceError as e:
        raise Refused(str(e), ExitCode.REFUSED) from None
    console.print(f"installed and started the {manager} service for {escape(run_dir.name)}", highlight=False)
    if manager == "systemd":
        console.print("  to keep it running after you log out and start it at boot: loginctl enable-linger $USER\n"
                      f"  its log: journalctl --user -u {escape(shlex.quote(service.instance(run_dir)))}", highlight=False)
    return ExitCode.OK


def cmd_uninstall(args) -> int:
    run_dir = resolve(args.run)
    manager = args.manager or service.default_manager()
    paths, commands = service.plan_uninstall(run_dir, manager)
    if args.dry_run:
        for cmd in commands:
            print("# would run: " + shlex.join(cmd))
        for path in paths:
            print(f"# would remove {path}")
        return ExitCode.OK
    try:
        service.check_available(manager)
        service.execute(commands)
    except service.ServiceError as e:
        raise Refused(str(e), ExitCode.REFUSED) from None
    for path in paths:
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    console.print(f"removed the {manager} service of {escape(run_dir.name)} (the run folder is untouched)")
    return ExitCode.OK


def cmd_run(args) -> int:
    """Idempotent: start a new run, resume an unfinished one, or do nothing for a finished one. A service
    restart keeps the crash-loop budget (only a person's `trainctl resume` starts a fresh one)."""
    run_dir = resolve(args.run)
    if runstate.supervisor_alive(run_dir):
        console.print(f"run {escape(run_dir.name)} already has a running supervisor; not starting a second one")
        return ExitCode.RUNNING
    saved = runstate.read_state(run_dir)
    if saved and saved.state in (State.SUCCEEDED, State.FAILED):   # a failed run waits for a person
        state = saved.state.value
        why = f" ({escape(saved.reason)})" if saved.reason else ""
        todo = "" if saved.state is State.SUCCEEDED else ": fix it, then `trainctl resume`"
        console.print(f"run {escape(run_dir.name)} already {state}{why}; nothing to do{todo}", highlight=False,
                      soft_wrap=True)
        notifier = Notifier()   # a Type=notify unit expects READY before a clean exit
        notifier.ready(f"{state}: nothing to do")
        notifier.stopping(state)
        return ExitCode.OK
    return run_foreground(run_dir, None, console)
