"""Unattended runs: unit and plist files, sd_notify on a real socket, the idempotent service start,
the sleep inhibitor's life, the morning report, hooks, disk-full and log rotation."""
from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import config_text, make_run, wait_for

from trainctl.contract.config import load
from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import ExitCode, Phase, read_heartbeat
from trainctl.contract.runfolder import committed_checkpoints
from trainctl.supervisor import logfiles, service
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.runstate import read_state

LINUX = sys.platform.startswith("linux")


def trainctl(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "trainctl.supervisor.command", *args], capture_output=True, text=True,
                          env=env or os.environ, **kw)


def spawns(run_dir):
    return [e for e in read_events(run_dir) if e["kind"] == Event.SPAWN]


@pytest.mark.parametrize("path", ["/home/me/runs/eva02-birds", "/tmp/a b/ü.x", "/srv/.hidden/r_1:2"])
def test_instance_names_match_systemd_escape(path):
    if not LINUX:
        pytest.skip("systemd-escape exists on Linux only")
    expected = subprocess.run(["systemd-escape", "--path", path], capture_output=True, text=True, check=True).stdout
    assert service.systemd_escape_path(Path(path)) == expected.strip()


def test_the_generated_unit_passes_systemd_analyze_verify(tmp_path, dataset, monkeypatch):
    if not LINUX:
        pytest.skip("systemd units are verified on Linux")
    assert shutil.which("systemd-analyze"), "install systemd (it provides systemd-analyze) to run this test"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    run_dir = make_run(tmp_path, "unit", config_text("unit", dataset))
    files, commands = service.plan_install(run_dir, "systemd")
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    unit_dir = service.unit_dir()
    result = subprocess.run(["systemd-analyze", "verify", service.instance(run_dir)], capture_output=True, text=True,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}, cwd=unit_dir)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if str(unit_dir) in line
                  or "trainctl" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    template = (unit_dir / "trainctl@.service").read_text()
    for key in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "KillMode=mixed", "KillSignal=SIGTERM",
                "TimeoutStopSec=", "Restart=on-failure", "RestartSec=30", "StartLimitBurst=", "StandardOutput=journal",
                f'ExecStart="{sys.executable}" -m trainctl.supervisor.command service run "%f"'):
        assert key in template, key
    dropin = next(unit_dir.glob("trainctl@*.service.d/trainctl.conf")).read_text()
    cfg = load(run_dir / "config.toml")
    assert f"WatchdogSec={cfg.supervisor.hang_timeout_seconds + 60:.0f}" in dropin
    assert f"TimeoutStopSec={cfg.supervisor.stop_timeout_seconds + 30:.0f}" in dropin
    assert commands[-1] == ["systemctl", "--user", "enable", "--now", service.instance(run_dir)]


def test_the_launchd_plist_loads_and_keeps_the_run_alive(tmp_path, dataset):
    run_dir = make_run(tmp_path, "plist", config_text("plist", dataset))
    files, commands = service.plan_install(run_dir, "launchd")
    (path, content), = files.items()
    plist = plistlib.loads(content)
    assert path.name == "dev.trainctl.plist.plist" and plist["Label"] == "dev.trainctl.plist"
    assert plist["ProgramArguments"] == [sys.executable, "-m", "trainctl.supervisor.command", "service", "run", str(run_dir)]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert 10 <= plist["ThrottleInterval"] <= 120 and plist["ProcessType"] == "Interactive"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(run_dir / "logs" / "service.log")
    assert plist["EnvironmentVariables"]["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert plist["ExitTimeOut"] > load(run_dir / "config.toml").supervisor.stop_timeout_seconds
    assert commands == [["launchctl", "bootstrap", f"gui/{os.getuid()}", str(path)]]


@pytest.mark.parametrize("manager", ["systemd", "launchd"])
def test_dry_runs_print_exactly_what_they_would_do_and_change_nothing(tmp_path, dataset, manager, monkeypatch):
    for key, value in {"XDG_CONFIG_HOME": tmp_path / "config", "HOME": tmp_path / "home",
                       "XDG_STATE_HOME": tmp_path / "state"}.items():
        monkeypatch.setenv(key, str(value))
    env = {**os.environ, "COLUMNS": "200"}
    (tmp_path / "c.toml").write_text(config_text("dry", dataset))
    result = trainctl("service", "install", "--config", str(tmp_path / "c.toml"), "--dry-run", "--manager", manager,
                      env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.OK, result.stderr
    run_dir = tmp_path / "runs" / "dry"
    files, commands = service.plan_install(run_dir, manager, load(tmp_path / "c.toml"))
    for path, content in files.items():
        assert f"# would write {path}:" in result.stdout
        assert content.decode().strip() in result.stdout
        assert not path.exists()
    assert [line for line in result.stdout.splitlines() if line.startswith("# would run: ")] == [
        "# would run: " + shlex.join(cmd) for cmd in commands]
    # Nothing at all was made: no run folder, no entry in the registry, nothing for `list` to show.
    assert not run_dir.exists() and not (tmp_path / "state").exists()
    assert "no runs yet" in trainctl("list", env=env, cwd=tmp_path).stdout
    run_dir = make_run(tmp_path, "dry", config_text("dry", dataset))
    paths, removals = service.plan_uninstall(run_dir, manager)
    result = trainctl("service", "uninstall", "dry", "--dry-run", "--manager", manager, env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.OK, result.stderr
    assert result.stdout.splitlines() == (["# would run: " + shlex.join(c) for c in removals]
                                          + [f"# would remove {p}" for p in paths])


def test_a_dry_run_may_look_at_a_running_run_and_a_real_install_over_it_is_refused(tmp_path, dataset, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    text = config_text("busy", dataset, train={"epochs": 100})
    (tmp_path / "busy.toml").write_text(text)
    run_dir = make_run(tmp_path, "busy", text)
    supervisor = subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                                  env={**os.environ, "TRAINCTL_FAULTS": ""}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (s := read_state(run_dir)) and s.supervisor_pid == supervisor.pid and s.state == "running",
                 120, what="the run to be running")
        frozen = (run_dir / "config.toml").read_bytes()
        for args in (["--config", str(tmp_path / "busy.toml")], [str(run_dir)]):
            dry = trainctl("service", "install", *args, "--dry-run", "--manager", "systemd", cwd=tmp_path)
            assert dry.returncode == ExitCode.OK and "# would run: systemctl --user enable --now" in dry.stdout, dry.stderr
        real = trainctl("service", "install", str(run_dir), "--manager", "systemd", cwd=tmp_path)
        assert real.returncode == ExitCode.RUNNING, real.stdout + real.stderr
        assert f"busy is already running (supervisor pid {supervisor.pid})" in real.stderr
        assert "trainctl stop busy" in real.stderr
        assert not service.unit_dir().exists() and (run_dir / "config.toml").read_bytes() == frozen
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=240)


def fake_systemctl(folder: Path, fail_on: str) -> Path:
    """A systemctl stand-in that logs its arguments and fails, as systemd does, at `fail_on` (no user bus)."""
    folder.mkdir()
    script = folder / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$@" >> "$SYSTEMCTL_LOG"\ncase "$*" in *{fail_on}*)\n'
                      '  echo "Failed to connect to bus: No medium found" >&2; exit 1;;\nesac\nexit 0\n')
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize("fail_on", ["daemon-reload", "enable"])
def test_a_failed_install_puts_back_what_was_there_and_says_what_to_do(tmp_path, dataset, fail_on):
    run_dir = make_run(tmp_path, "rb", config_text("rb", dataset))
    unit_dir = tmp_path / "config" / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    (unit_dir / "trainctl@.service").write_text("# another run's install put this here\n")
    (unit_dir / "other.service").write_text("[Unit]\n")
    bin_dir = fake_systemctl(tmp_path / "bin", fail_on)
    log = tmp_path / "systemctl.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SYSTEMCTL_LOG": str(log),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    result = trainctl("service", "install", str(run_dir), "--manager", "systemd", env=env)
    assert result.returncode == ExitCode.REFUSED, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "Failed to connect to bus" in message and "Nothing was installed" in message
    assert "trainctl resume rb --foreground" in message and "tmux" in message
    assert sorted(p.name for p in unit_dir.iterdir()) == ["other.service", "trainctl@.service"]
    assert (unit_dir / "trainctl@.service").read_text() == "# another run's install put this here\n"
    calls = log.read_text().splitlines()
    if fail_on == "enable":   # systemd may have enabled part of it: undone, then reloaded without our files
        assert calls[-2:] == [f"--user disable --now {service.instance(run_dir)}", "--user daemon-reload"]
    else:
        assert calls == ["--user daemon-reload"]


def test_the_user_unit_and_the_plist_say_only_what_does_something(tmp_path, dataset, monkeypatch):
    assert "network-online" not in service.unit(sys.executable)   # a user manager has no network targets
    monkeypatch.setenv("PATH", "/opt/bin:/usr/bin:/bin:/opt/bin:/usr/bin::/sbin")
    run_dir = make_run(tmp_path, "path", config_text("path", dataset))
    plist = service.launchd_plist(run_dir, load(run_dir / "config.toml"))
    assert plist["EnvironmentVariables"]["PATH"] == "/opt/bin:/usr/bin:/bin:/sbin"


def test_service_install_checks_the_config_before_it_creates_anything(tmp_path, dataset):
    (tmp_path / "c.toml").write_text(config_text("unknown", dataset, model={"name": "tset_vit"}))
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state")}
    result = trainctl("service", "install", "--config", str(tmp_path / "c.toml"), "--manager", "systemd", env=env)
    assert result.returncode == ExitCode.BAD_CONFIG and "is not a timm model" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "config").exists() and not (tmp_path / "state").exists()


def test_a_missing_service_manager_is_a_clear_error(tmp_path, dataset):
    run_dir = make_run(tmp_path, "nosd", config_text("nosd", dataset))
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = trainctl("service", "install", str(run_dir), env={**os.environ, "PATH": str(empty),
                      "XDG_CONFIG_HOME": str(tmp_path / "config"), "HOME": str(tmp_path)})
    assert result.returncode == ExitCode.REFUSED
    assert "not available here" in result.stderr and "--foreground" in result.stderr


class Listener:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.done = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            for line in data.splitlines():
                self.messages.append((time.monotonic(), line))

    def times(self, prefix: str) -> list[float]:
        return [t for t, m in list(self.messages) if m.startswith(prefix)]

    def close(self):
        self.done = True
        self.sock.close()


def test_sd_notify_ready_watchdog_only_while_progressing_and_stopping(tmp_path, dataset):
    text = config_text("notify", dataset, train={"epochs": 100}, supervisor={"hang_timeout_seconds": 6})
    run_dir = make_run(tmp_path, "notify", text)
    listener = Listener(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "20000000",
           "TRAINCTL_FAULTS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "trainctl.supervisor.command", "service", "run", str(run_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: listener.times("READY=1"), 120, what="READY=1")
        ready_event = [e for e in read_events(run_dir) if e["kind"] == Event.WORKER_READY]
        assert ready_event, "READY=1 came before the worker passed its sanity check"
        assert "passed" in (run_dir / "logs" / "worker.log").read_text()
        wait_for(lambda: len(listener.times("WATCHDOG=1")) >= 5, 120, what="watchdog pings while training")
        assert any(m.startswith("STATUS=running: epoch") for _, m in listener.messages)
        hb = read_heartbeat(run_dir)
        os.kill(hb.pid, signal.SIGSTOP)                   # a hung worker: the pings must stop
        frozen = time.monotonic()
        wait_for(lambda: [e for e in read_events(run_dir) if e["kind"] == Event.HANG_DETECTED], 120, what="hang")
        detected = time.monotonic()
        # A ping needs a beat newer than the last ping: a frozen worker earns at most the one for its last beat.
        pings = [t for t in listener.times("WATCHDOG=1") if frozen < t < detected]
        assert len(pings) <= 1, f"{len(pings)} pings while the worker was hung"
        wait_for(lambda: [t for t in listener.times("WATCHDOG=1") if t > detected], 120,
                 what="pings again after the recovery")
        proc.send_signal(signal.SIGTERM)                  # what `systemctl stop` does (KillSignal=SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        listener.close()
    assert proc.returncode == 0, out
    assert listener.times("STOPPING=1") and read_state(run_dir).state == "stopped"


def fake_inhibitor(folder: Path) -> Path:
    """A systemd-inhibit stand-in: records its arguments, then runs its command as the real one does."""
    folder.mkdir()
    script = folder / "systemd-inhibit"
    script.write_text('#!/bin/sh\necho "$@" >> "$INHIBIT_LOG"\n'
                      'while [ $# -gt 0 ]; do case "$1" in --*) shift;; *) break;; esac; done\nexec "$@"\n')
    script.chmod(0o755)
    return folder


def inhibitors(supervisor_pid: int):
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if f"--pid={supervisor_pid}" in cmd:
            found.append(p)
    return found


@pytest.mark.skipif(not LINUX, reason="the systemd-inhibit path is Linux's; macOS uses caffeinate -w")
def test_service_start_is_idempotent_keeps_the_machine_awake_and_reports(tmp_path, dataset):
    hook = tmp_path / "hook.txt"
    text = config_text("svc", dataset, train={"epochs": 30},
                       supervisor={"on_finish": f"env | grep ^TRAINCTL_ | sort > {hook}"})
    run_dir = make_run(tmp_path, "svc", text)
    bin_dir = fake_inhibitor(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "INHIBIT_LOG": str(tmp_path / "inhibit.log"),
           "TRAINCTL_FAULTS": ""}
    env.pop("NOTIFY_SOCKET", None)
    first = subprocess.Popen([sys.executable, "-m", "trainctl.supervisor.command", "service", "run", str(run_dir)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        hb = wait_for(lambda: (h := read_heartbeat(run_dir)) and h.phase is Phase.TRAINING and h.step >= 5 and h,
                      120, what="training")
        args = (tmp_path / "inhibit.log").read_text().split()
        assert args[:4] == ["--what=sleep:idle", "--who=trainctl", "--why=training", "run"]
        assert "--mode=block" in args and f"--pid={first.pid}" in args and args[-2:] == ["-f", "/dev/null"]
        assert inhibitors(first.pid)
        first.kill()                                      # the supervisor dies: no clean-up of any kind
        first.wait()
        wait_for(lambda: not inhibitors(first.pid), 60, what="the inhibitor to go with the supervisor")
        psutil.Process(hb.pid).wait(timeout=120)         # the orphaned worker checkpoints and leaves
    finally:
        first.kill()
    saved = committed_checkpoints(run_dir / "checkpoints")[-1].step
    second = trainctl("service", "run", str(run_dir), env=env, timeout=300)
    assert second.returncode == 0 and read_state(run_dir).state == "succeeded", second.stdout
    assert spawns(run_dir)[-1]["step"] == saved          # resumed from its newest checkpoint
    pid = read_state(run_dir).supervisor_pid
    assert not inhibitors(pid)                             # released when the run ended
    report = (run_dir / "report.md").read_text()
    for words in ("SUCCEEDED", "goodput:", "crashes: 0", "checkpoints written:", "final validation accuracy:"):
        assert words in report, words
    assert "TRAINCTL_STATE=succeeded" in hook.read_text() and f"TRAINCTL_RUN_DIR={run_dir}" in hook.read_text()
    third = trainctl("service", "run", str(run_dir), env=env, timeout=120)
    assert third.returncode == 0 and "already succeeded" in third.stdout
    assert len(spawns(run_dir)) == 2                       # no training again


def test_disk_full_fails_with_its_own_reason_and_keeps_the_previous_checkpoint(tmp_path, dataset):
    text = config_text("full", dataset, supervisor={"on_failure": f"echo $TRAINCTL_REASON > {tmp_path / 'why'}"},
                       checkpoint={"async_write": False})   # checkpoints at 3, 6, 9
    run_dir = make_run(tmp_path, "full", text)
    env = {**os.environ, "TRAINCTL_FAULTS": "ckpt_bytes:enospc@9"}
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=240)
    state = read_state(run_dir)
    assert result.returncode == ExitCode.FAILED and state.state == "failed", result.stdout
    assert state.reason.startswith("disk_full:") and "no space left" in state.reason
    assert [c.step for c in committed_checkpoints(run_dir / "checkpoints")] == [3, 6]   # keep_last = 2, intact
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert "disk_full" in (tmp_path / "why").read_text()
    assert len(spawns(run_dir)) == 1                       # not restarted: it would only fail again


def test_logs_rotate_under_a_writer_that_appends(tmp_path):
    log = tmp_path / "worker.log"
    with open(log, "ab") as writer:
        for _ in range(10):    # rotations after the 3rd, 6th and 9th line
            writer.write(b"x" * 1000 + b"\n")
            writer.flush()
            logfiles.rotate_if_needed(log, max_bytes=2500, keep=2)
        writer.write(b"last line\n")
        writer.flush()
    assert log.read_bytes().endswith(b"last line\n") and log.stat().st_size < 2500
    assert (tmp_path / "worker.log.1").exists() and (tmp_path / "worker.log.2").exists()
    assert not (tmp_path / "worker.log.3").exists()


def test_the_shipped_unit_is_what_the_code_writes():
    shipped = (Path(__file__).resolve().parent.parent / "systemd" / "trainctl@.service").read_text()
    assert shipped == service.unit("/path/to/venv/bin/python")
