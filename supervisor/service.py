"""Running unattended: systemd user units and launchd agents, and the idempotent service start command.

``trainctl service run RUN`` is what the service manager starts: it begins a new run, resumes one
whose supervisor died (or whose machine rebooted) from the newest checkpoint, and exits 0 at once
for a run that already succeeded or failed (a failed run waits for a person: fix, then resume).
Exit codes (`ExitCode`): 1 (the run failed) and 3 (bad config) are final, restarting cannot help;
70 (the supervisor's own error, the worker stopped at a checkpoint) and any crash are restarted.
"""
from __future__ import annotations

import contextlib
import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from trainctl.contract.config import Config, load
from trainctl.contract.names import shell_run
from trainctl.contract.protocol import ExitCode
from trainctl.contract.runfolder import CONFIG_FILE, LOG_DIR, SERVICE_LOG

from .watch import service_seconds

TEMPLATE = "trainctl@.service"
FINAL_EXIT_CODES = (ExitCode.FAILED, ExitCode.BAD_CONFIG)   # never restarted: they would only happen again
UNIT = """\
# trainctl: one instance per run; the instance name is the run folder (systemd-escape --path).
# Written by `trainctl service install`; run-specific timeouts are in the instance's drop-in.
[Unit]
Description=trainctl training run %f
StartLimitIntervalSec=1800
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart="{python}" -m trainctl.supervisor.command service run "%f"
WorkingDirectory=%f
Environment=PYTHONUNBUFFERED=1
KillMode=mixed
KillSignal=SIGTERM
Restart=on-failure
RestartSec=30
# 1: the run failed (the policy gave up); 3: bad config. Restarting cannot help either.
# 70 (the supervisor's own error; the worker stopped at a checkpoint) is restarted, and resumes.
RestartPreventExitStatus={final}
TimeoutStartSec=960
TimeoutStopSec=150
WatchdogSec=360
StandardOutput=journal
StandardError=journal

[Install]
WantedBy=default.target
"""
DROPIN = """\
# trainctl: timeouts of run {name}, from its config.
[Service]
# The first worker must pass its sanity check within this (imports, model, checkpoint load).
TimeoutStartSec={start:.0f}
# A graceful stop lets the worker finish its step and write a checkpoint.
TimeoutStopSec={stop:.0f}
# WATCHDOG=1 is sent only while the run makes progress; the supervisor's own hang
# detection (hang_timeout_seconds) acts first, systemd acts if that does not help.
WatchdogSec={watchdog:.0f}
"""


class ServiceError(RuntimeError):
    """The service manager is missing or refused; the message says what to do instead."""


def systemd_escape_path(path: Path) -> str:
    """`systemd-escape --path`: '/home/me/runs/x-1' -> 'home-me-runs-x\\x2d1'."""
    text = "/".join(p for p in str(path).split("/") if p) or "/"
    if text == "/":
        return "-"
    out = []
    for i, byte in enumerate(text.encode()):
        ch = chr(byte)
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and (ch.isalnum() or ch in ":_.")) and not (ch == "." and i == 0):
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user"


def instance(run_dir: Path) -> str:
    return f"trainctl@{systemd_escape_path(run_dir)}.service"


def unit(python: str) -> str:
    """The template unit, for this Python."""
    return UNIT.format(python=python, final=" ".join(str(int(c)) for c in FINAL_EXIT_CODES))


def systemd_files(run_dir: Path, cfg: Config) -> dict[Path, str]:
    """The template and the run's drop-in, keyed by where they go."""
    s = cfg.supervisor
    return {
        unit_dir() / TEMPLATE: unit(sys.executable),
        unit_dir() / f"{instance(run_dir)}.d" / "trainctl.conf": DROPIN.format(
            name=cfg.run.name, start=service_seconds(s.startup_timeout_seconds) + 60, stop=s.stop_timeout_seconds + 30,
            watchdog=service_seconds(s.hang_timeout_seconds) + 60),
    }


def launchd_label(run_dir: Path) -> str:
    return "dev.trainctl." + re.sub(r"[^A-Za-z0-9.-]", "-", Path(run_dir).name)


def launchd_plist(run_dir: Path, cfg: Config) -> dict:
    """A LaunchAgent that keeps the run going: restarted on a crash, not after a clean exit."""
    log = str(Path(run_dir) / LOG_DIR / SERVICE_LOG)
    return {
        "Label": launchd_label(run_dir),
        "ProgramArguments": [sys.executable, "-m", "trainctl.supervisor.command", "service", "run", str(run_dir)],
        "WorkingDirectory": str(run_dir),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},       # restart on a crash, not after a successful exit
        "ThrottleInterval": 30,                       # at most one start per 30 s
        "ProcessType": "Interactive",                 # "Background" would be CPU- and IO-throttled
        "LowPriorityIO": False,
        "ExitTimeOut": int(cfg.supervisor.stop_timeout_seconds + 30),   # SIGTERM → SIGKILL grace
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1", "PYTORCH_ENABLE_MPS_FALLBACK": "1",
                                 "PATH": unique_path(os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")),
                                 "HOME": os.path.expanduser("~")},
    }


def unique_path(path: str) -> str:
    """$PATH with each folder once, in its first place (shells that source their profile twice repeat them)."""
    return os.pathsep.join(dict.fromkeys(p for p in path.split(os.pathsep) if p))


def launchd_path(run_dir: Path) -> Path:
    return Path(os.path.expanduser("~")) / "Library" / "LaunchAgents" / f"{launchd_label(run_dir)}.plist"


def plan_install(run_dir: Path, manager: str, cfg: Config | None = None) -> tuple[dict[Path, bytes], list[list[str]]]:
    """Files to write and commands to run to install and start the run's service (`cfg`: default the frozen one)."""
    cfg = cfg or load(run_dir / CONFIG_FILE)
    if manager == "systemd":
        files = {p: t.encode() for p, t in systemd_files(run_dir, cfg).items()}
        return files, [["systemctl", "--user", "daemon-reload"],
                       ["systemctl", "--user", "enable", "--now", instance(run_dir)]]
    path = launchd_path(run_dir)
    return ({path: plistlib.dumps(launchd_plist(run_dir, cfg))},
            [["launchctl", "bootstrap", f"gui/{os.getuid()}", str(path)]])


def plan_uninstall(run_dir: Path, manager: str) -> tuple[list[Path], list[list[str]]]:
    """Files to remove and commands to run to stop and remove the run's service."""
    if manager == "systemd":
        dropin = unit_dir() / f"{instance(run_dir)}.d"
        return ([dropin / "trainctl.conf", dropin],
                [["systemctl", "--user", "disable", "--now", instance(run_dir)],
                 ["systemctl", "--user", "daemon-reload"]])
    return ([launchd_path(run_dir)], [["launchctl", "bootout", f"gui/{os.getuid()}/{launchd_label(run_dir)}"]])


def default_manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def check_available(manager: str) -> None:
    tool = "systemctl" if manager == "systemd" else "launchctl"
    if shutil.which(tool) is None:
        raise ServiceError(f"{manager} is not available here (no {tool}). Run the supervisor yourself instead: "
                           f"trainctl resume RUN --foreground (under tmux, screen or nohup).")


def execute(commands: list[list[str]]) -> None:
    for cmd in commands:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip().splitlines()
            raise ServiceError(f"`{' '.join(cmd)}` failed: {why[-1] if why else result.returncode}. "
                               + ("Is there a user session bus? Log in on a console or use "
                                  "`loginctl enable-linger $USER`." if cmd[0] == "systemctl" else ""))


def install(run_dir: Path, manager: str, files: dict[Path, bytes], commands: list[list[str]]) -> None:
    """Write the files and run the commands; on any failure put back what was there before (ServiceError)."""
    before: dict[Path, bytes | None] = {}
    made: list[Path] = []   # folders this install created, deepest last
    ran = 0
    try:
        for path, content in files.items():
            made += [d for d in reversed(path.parents) if not d.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            before[path] = path.read_bytes() if path.exists() else None
            path.write_bytes(content)
        for cmd in commands:
            execute([cmd])
            ran += 1
    except (ServiceError, OSError) as e:
        for path, old in before.items():
            with contextlib.suppress(OSError):
                if old is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_bytes(old)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if ran:   # the manager may have enabled or loaded part of it: undo that too, as far as it goes
            for cmd in plan_uninstall(run_dir, manager)[1]:
                with contextlib.suppress(OSError):
                    subprocess.run(cmd, capture_output=True, text=True)
        raise ServiceError(f"{str(e).rstrip('. ')}. Nothing was installed (the files written were removed). Run the supervisor "
                           f"yourself instead: trainctl resume {shell_run(run_dir)} --foreground (under tmux, screen "
                           f"or nohup).") from None
