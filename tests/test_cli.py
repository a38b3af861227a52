"""`trainctl` as people and scripts use it: real subprocesses, a detached supervisor, real crashes."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import config_text, wait_for

from trainctl.contract.protocol import ExitCode


@pytest.fixture
def env(tmp_path):
    """An isolated home for the run registry; commands run in tmp_path."""
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "120", "TRAINCTL_FAULTS": ""}


def trainctl(*args, env, cwd, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from trainctl.supervisor.cli import main; raise SystemExit(main())",
                           *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def status(run, env, cwd) -> dict:
    result = trainctl("status", run, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


SCHEMA = {"state": str, "reason": (str, type(None)), "supervisor_pid": (int, type(None)),
          "worker_pid": (int, type(None)), "rung": dict, "step": int, "total_steps": (int, type(None)),
          "epoch": (int, type(None)), "samples_seen": int, "restarts": int, "crashes": list,
          "last_checkpoint": (dict, type(None)), "final_model": (str, type(None)), "bad_images": int}
STATES = {"starting", "running", "backoff", "stopping", "stopped", "succeeded", "failed"}


def check_schema(st: dict) -> None:
    for key, kind in SCHEMA.items():
        assert isinstance(st[key], kind), (key, st[key])
    assert st["state"] in STATES
    assert set(st["rung"]) >= {"number", "of", "device", "batch_size", "grad_accum"}
    for crash in st["crashes"]:
        assert set(crash) >= {"at", "kind", "signal", "exit_code", "rung", "step"}
    if st["last_checkpoint"]:
        assert set(st["last_checkpoint"]) >= {"step", "path", "age_seconds"}


def end(pids: set, run_dir) -> None:
    """SIGKILL the processes this test started (their pids, if they still run this run: pids are reused)."""
    for pid in pids - {None}:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if str(run_dir) in " ".join(process.cmdline()):
                process.kill()


def test_start_status_crash_stop_resume_succeed(tmp_path, dataset, env):
    (tmp_path / "run.toml").write_text(config_text("e2e", dataset, train={"epochs": 40}))
    result = trainctl("start", "--config", "run.toml", env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "trainctl status e2e" in result.stdout and "supervisor pid" in result.stdout
    started = {int(result.stdout.split("supervisor pid ")[1].split()[0])}   # to end if the test fails
    try:
        again = trainctl("start", "--config", "run.toml", env=env, cwd=tmp_path)
        assert again.returncode == ExitCode.RUNNING and "already running" in again.stderr
        st = wait_for(lambda: (s := status("e2e", env, tmp_path))["state"] == "running" and s["step"] >= 3 and s,
                      120, what="running")
        check_schema(st)
        assert st["supervisor_pid"] and st["worker_pid"] and st["rung"] == {
            "number": 1, "of": 2, "device": "cpu", "batch_size": 8, "grad_accum": 2}
        started.update({st["supervisor_pid"], st["worker_pid"]})
        os.kill(st["worker_pid"], signal.SIGKILL)
        st = wait_for(lambda: (s := status("e2e", env, tmp_path))["crashes"] and s["state"] == "running" and s,
                      120, what="the crash to show")
        assert st["crashes"][0]["kind"] == "killed" and st["crashes"][0]["signal"] == "SIGKILL" and st["restarts"] == 1
        assert st["crashes"][0]["rung"] == 1
        started.add(st["worker_pid"])
        human = trainctl("status", "e2e", env=env, cwd=tmp_path)
        assert "RUNNING" in human.stdout and "killed" in human.stdout and "SIGKILL" in human.stdout
        wait_for(lambda: status("e2e", env, tmp_path)["step"] >= 3, 120, what="training again")
        stopped = trainctl("stop", "e2e", env=env, cwd=tmp_path)
        assert stopped.returncode == ExitCode.OK and "stopped e2e at step" in stopped.stdout, stopped.stderr
        st = status("e2e", env, tmp_path)
        check_schema(st)
        assert st["state"] == "stopped" and st["last_checkpoint"]["step"] == st["step"]
        assert st["worker_pid"] is None and st["supervisor_pid"] is None
        not_running = trainctl("stop", "e2e", env=env, cwd=tmp_path)
        assert not_running.returncode == ExitCode.REFUSED and "not running" in not_running.stderr
        unfinished = trainctl("start", "--config", "run.toml", env=env, cwd=tmp_path)
        assert unfinished.returncode == ExitCode.REFUSED and "trainctl resume e2e" in unfinished.stderr
        resumed = trainctl("resume", "e2e", env=env, cwd=tmp_path)
        assert resumed.returncode == ExitCode.OK, resumed.stderr
        started.add(status("e2e", env, tmp_path)["supervisor_pid"])
        busy = trainctl("resume", "e2e", env=env, cwd=tmp_path)
        assert busy.returncode == ExitCode.RUNNING
        st = wait_for(lambda: (s := status("e2e", env, tmp_path))["state"] == "succeeded" and s, 240, what="success")
    finally:
        end(started, tmp_path / "runs" / "e2e")
    check_schema(st)
    assert st["final_model"].endswith("model.safetensors") and st["step"] == st["total_steps"] == 240
    assert trainctl("resume", "e2e", env=env, cwd=tmp_path).returncode == ExitCode.REFUSED
    listed = trainctl("list", env=env, cwd=tmp_path)
    assert "e2e" in listed.stdout and "succeeded" in listed.stdout
    logs = trainctl("logs", "e2e", env=env, cwd=tmp_path)
    assert "sanity check passed" in logs.stdout and "=== attempt 3" in logs.stdout
    latest = trainctl("status", "--json", env=env, cwd=tmp_path)     # no RUN: the most recent run
    assert json.loads(latest.stdout)["run_name"] == "e2e"


def bad_configs(tmp_path, dataset):
    good = config_text("bad", dataset)
    empty = tmp_path / "empty-data"
    empty.mkdir()
    (empty / "readme.txt").write_text("no class folders here")
    return {
        "missing.toml": (None, "does not exist"),
        "unparsable.toml": ("[run\nname = 1", "not valid TOML"),
        "unknown-key.toml": (good.replace("epochs = 3", "epoch = 3"), "[train].epoch. Did you mean 'epochs'"),
        "wrong-type.toml": (good.replace("epochs = 3", 'epochs = "three"'), "whole number"),
        "no-data.toml": (good.replace(str(dataset[0]), str(tmp_path / "nowhere")), "does not exist"),
        "no-classes.toml": (good.replace(str(dataset[0]), str(empty)), "no class folders"),
        "indivisible.toml": (good.replace("batch_size = 4", "batch_size = 5"), "does not divide"),
        "unknown-model.toml": (good.replace('name = "test_vit"', 'name = "tset_vit"'), "is not a timm model"),
    }


def test_bad_input_gives_one_clear_line_and_its_exit_code(tmp_path, dataset, env):
    for name, (text, words) in bad_configs(tmp_path, dataset).items():
        if text is not None:
            (tmp_path / name).write_text(text)
        result = trainctl("start", "--config", name, env=env, cwd=tmp_path)
        assert result.returncode == ExitCode.BAD_CONFIG, (name, result.stdout, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) <= 3, (name, result.stderr)   # one message, wrapped
    for args, code, words in [(("status", "nosuchrun"), ExitCode.NOT_FOUND, "not found"),
                              (("status", str(tmp_path)), ExitCode.NOT_FOUND, "not a trainctl run"),
                              (("stop", "nosuchrun"), ExitCode.NOT_FOUND, "not found"),
                              (("resume", "nosuchrun"), ExitCode.NOT_FOUND, "not found"),
                              (("launch",), 2, "invalid choice")]:
        result = trainctl(*args, env=env, cwd=tmp_path)
        assert result.returncode == code and words in result.stderr, (args, result.stderr)


def test_demo_shows_the_crash_and_the_recovery(tmp_path, env):
    result = trainctl("demo", "--fast", "--dir", str(tmp_path / "demo"), env=env, cwd=tmp_path, timeout=400)
    out = result.stdout
    assert result.returncode == ExitCode.OK, out + result.stderr
    assert "killing the worker" in out and "ended: killed" in out and "restarting" in out
    assert "demo finished: validation accuracy" in out
    accuracy = float(out.split("validation accuracy ")[1].split("%")[0]) / 100
    assert accuracy >= 0.5     # chance is 25%


def test_a_bug_in_a_command_is_an_internal_error_not_a_failed_run(monkeypatch, capsys):
    """Python's own exit code for an uncaught exception is 1, which means "the run failed" to the services
    (never restarted): trainctl's own errors exit 70 with the traceback instead."""
    from trainctl.supervisor import cli

    def broken(run):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "resolve", broken)
    assert cli.main(["status", "anything"]) == ExitCode.INTERNAL_ERROR == 70
    err = capsys.readouterr().err
    assert "internal error" in err and "RuntimeError: a bug" in err and "Traceback" in err
