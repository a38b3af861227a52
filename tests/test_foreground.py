"""A supervisor in the foreground: its output goes away (a closed pipe, a hung-up terminal, SIGHUP) and
the run still ends, recorded; without a terminal it prints plain, unwrapped lines with progress."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import psutil
import pytest
from conftest import config_text, make_run

from trainctl.contract.protocol import ExitCode

CLI = [sys.executable, "-c", "from trainctl.supervisor.cli import main; raise SystemExit(main())"]
STAMP = r"\d\d:\d\d:\d\d"


@pytest.fixture
def env(tmp_path):
    """An isolated run registry; no faults; COLUMNS as a person's narrow terminal would set it."""
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TRAINCTL_FAULTS": "", "COLUMNS": "40"}


def write_config(tmp_path, dataset, name: str) -> Path:
    (tmp_path / "run.toml").write_text(config_text(name, dataset))
    return tmp_path / "runs" / name


def end(proc: subprocess.Popen, run_dir) -> None:
    """SIGKILL what this test started, if it still runs: the command, and the run's worker (by its pid, while
    that pid still runs this run: pids are reused)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in worker_pids(run_dir) - {None}:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if str(run_dir) in " ".join(process.cmdline()):
                process.kill()


def worker_pids(run_dir) -> set:
    with contextlib.suppress(OSError, ValueError):
        return {json.loads((run_dir / "state.json").read_text()).get("worker_pid")}
    return set()


def assert_ended_recorded(run_dir) -> None:
    """The run's own records say it succeeded: state, model, report."""
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "succeeded", state
    assert (run_dir / "model.safetensors").stat().st_size > 0
    assert "SUCCEEDED" in (run_dir / "report.md").read_text()


def test_a_pipe_closed_by_its_reader_does_not_end_the_run(tmp_path, dataset, env):
    """`trainctl start --foreground | head -3`: the reader goes early; training and its records go on."""
    run_dir = write_config(tmp_path, dataset, "piped")
    proc = subprocess.Popen([*CLI, "start", "--config", "run.toml", "--foreground"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = []
        while not any(b"attempt 1: worker pid" in line for line in seen):   # head reads a few lines, then exits
            line = proc.stdout.readline()
            assert line, (b"".join(seen), proc.stderr.read())
            seen.append(line)
        proc.stdout.close()
        rc = proc.wait(timeout=300)
        err = proc.stderr.read().decode()
    finally:
        end(proc, run_dir)
    assert rc == ExitCode.OK, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert_ended_recorded(run_dir)
    log = (run_dir / "logs" / "supervisor.log").read_text()    # what could not be shown is kept
    assert "output went away" in log and "run succeeded" in log and "report:" in log


def test_a_terminal_that_hangs_up_does_not_end_the_run(tmp_path, dataset, env):
    """The SSH session drops: the controlling terminal hangs up (SIGHUP, then EIO on every write)."""
    run_dir = write_config(tmp_path, dataset, "hungup")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))

    def own_terminal():   # in the child, a session leader: the pty becomes its controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    proc = subprocess.Popen([*CLI, "start", "--config", "run.toml", "--foreground"], env=env, cwd=tmp_path,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True, preexec_fn=own_terminal)
    os.close(slave)
    try:
        shown = b""
        while b"attempt 1: worker pid" not in shown or b"STARTING" not in shown:   # a frame, and the attempt began
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, shown
            shown += os.read(master, 65536)
        assert psutil.Process(proc.pid).terminal() is not None   # it really has the pty as its terminal
        # The live panel's first frames say "starting", never "supervisor not running" (issue 16, item 7).
        assert b"STARTING" in shown and b"not running" not in shown, shown
        os.close(master)     # the hang-up: the kernel sends SIGHUP to the session's leader, this process
        rc = proc.wait(timeout=300)
    finally:
        end(proc, run_dir)
    assert rc == ExitCode.OK, rc
    assert_ended_recorded(run_dir)
    assert "run succeeded" in (run_dir / "logs" / "supervisor.log").read_text()


def test_the_supervisor_survives_sighup_and_a_closed_stdout(tmp_path, dataset):
    """`python -m trainctl.supervisor` (what start detaches) with its stdout a pipe whose reader left, then SIGHUP."""
    run_dir = make_run(tmp_path, "hup", config_text("hup", dataset))
    proc = subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                            env={**os.environ, "TRAINCTL_FAULTS": ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while b"attempt 1: worker pid" not in (line := proc.stdout.readline()):
            assert line, proc.stderr.read()
        proc.stdout.close()
        proc.send_signal(signal.SIGHUP)
        rc = proc.wait(timeout=300)
        err = proc.stderr.read().decode()
    finally:
        end(proc, run_dir)
    assert rc == ExitCode.OK, (rc, err)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert_ended_recorded(run_dir)


def test_without_a_terminal_lines_are_plain_unwrapped_and_show_progress(tmp_path, dataset, env):
    """A service's log, nohup, a redirect: `HH:MM:SS message` lines, never wrapped (COLUMNS is 40 here), one
    progress line per `[train] log_every_steps` (2 here: 9 of the run's 18 steps), and the final panel. Started
    with `--rung 2`: the whole run trains on the second rung."""
    run_dir = write_config(tmp_path, dataset, "plain-output-of-a-run-with-a-long-name")
    with open(tmp_path / "out.log", "wb") as out:
        result = subprocess.run([*CLI, "start", "--config", "run.toml", "--foreground", "--rung", "2"], env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.PIPE, timeout=300)
    text = (tmp_path / "out.log").read_text()
    assert result.returncode == ExitCode.OK, text + result.stderr.decode()
    lines = text.splitlines()
    report = f"report: {run_dir / 'report.md'}"
    assert any(re.fullmatch(rf"{STAMP} {re.escape(report)}( \(goodput .*\))?", line) for line in lines), text
    assert any(re.fullmatch(rf"{STAMP} attempt 1: worker pid \d+ on rung 2 \(.*\), from the start", line)
               for line in lines), text
    progress = [re.fullmatch(rf"{STAMP} epoch (\d+\.\d\d)/3 step (\d+)/18 loss \d+\.\d{{4}} acc [01]\.\d{{3}} "
                             rf"\d+\.\d images/s ETA \S+ rung 2/2", line) for line in lines]
    assert [int(m.group(2)) for m in progress if m] == list(range(2, 19, 2)), text
    validations = [re.fullmatch(rf"{STAMP} epoch (\d)/3 validation: top-1 [01]\.\d{{3}}", line) for line in lines]
    assert [int(m.group(1)) for m in validations if m] == [1, 2, 3], text
    assert "\x1b[" not in text                                   # no terminal codes in a log
    model = str(run_dir / "model.safetensors")
    assert any(model in line and "model" in line.split(model)[0] for line in lines), text   # the panel, unwrapped
