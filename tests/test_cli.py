"""`trainctl` as people and scripts use it: real subprocesses, a detached supervisor, real crashes."""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import LONG, config_text, events, make_run, wait_for

from trainctl.contract.protocol import ExitCode
from trainctl.supervisor.cli import build_parser
from trainctl.supervisor.runs import remember


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
            "number": 1, "of": 2, "device": "cpu", "batch_size": 8, "grad_accum": 2, "nproc_per_node": 1}
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


def absent_device() -> str:
    """A device this machine does not have: MPS off macOS, CUDA on a Mac."""
    return "cuda" if sys.platform == "darwin" else "mps"


def registered(env) -> list[str]:
    path = Path(env["XDG_STATE_HOME"]) / "trainctl" / "runs.json"
    return json.loads(path.read_text()) if path.exists() else []


def test_what_only_the_worker_could_tell_is_checked_before_a_run_folder_exists(tmp_path, dataset, env):
    device = absent_device()
    cases = {
        "unknown-model": ({"model": {"name": "tset_vit"}}, ["[model] name = 'tset_vit' is not a timm model",
                                                            "Did you mean 'test_vit'"]),
        "unknown-tag": ({"model": {"name": "test_vit.bogus"}}, ["no pretrained tag 'bogus'", "test_vit.r160_in1k"]),
        "absent-device": ({"profiles": [{"device": "cpu", "batch_size": 8}, {"device": device, "batch_size": 4}]},
                          ["[[profiles]] #2 (rung 2)", f"device '{device}'"]),
        "unknown-optimizer": ({"train": {"opt": "adamz"}}, ["[train] opt = 'adamz'"]),
    }
    for name, (sections, words) in cases.items():
        (tmp_path / f"{name}.toml").write_text(config_text("pre", dataset, **sections))
        result = trainctl("start", "--config", f"{name}.toml", env=env, cwd=tmp_path)
        assert result.returncode == ExitCode.BAD_CONFIG, (name, result.stdout, result.stderr)
        assert all(w in result.stderr for w in words) and "Traceback" not in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "runs" / "pre").exists() and registered(env) == [], name   # nothing was made
    (tmp_path / "good.toml").write_text(config_text("pre", dataset, model={"name": "test_vit.r160_in1k"}))
    checked = subprocess.run([sys.executable, "-m", "trainctl.worker", "--check-config", str(tmp_path / "good.toml")],
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0 and "config ok" in checked.stdout, checked.stderr   # a pretrained tag is a name


def test_a_run_that_never_trained_is_left_out_and_a_new_start_begins_afresh(tmp_path, dataset, env):
    from safetensors.torch import save_file
    import torch
    save_file({"unrelated.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))   # readable, but not this model's
    (tmp_path / "bad.toml").write_text(config_text("neverfit", dataset, model={"weights": "other.safetensors"}, train=LONG))
    (tmp_path / "good.toml").write_text(config_text("neverfit", dataset, train=LONG))
    failed = trainctl("start", "--config", "bad.toml", env=env, cwd=tmp_path)
    assert failed.returncode == ExitCode.BAD_CONFIG and "does not fit" in failed.stderr, failed.stdout + failed.stderr
    run_dir = tmp_path / "runs" / "neverfit"
    assert status("neverfit", env, tmp_path)["state"] == "failed"       # still there for status and logs...
    listed = trainctl("list", "--json", env=env, cwd=tmp_path)
    assert [r["run_name"] for r in json.loads(listed.stdout)] == []      # ...but not a run to list
    table = trainctl("list", env=env, cwd=tmp_path)
    assert "neverfit" not in table.stdout and "1 run(s) that never trained" in table.stdout
    everything = trainctl("list", "--all", "--json", env=env, cwd=tmp_path)
    assert [r["run_name"] for r in json.loads(everything.stdout)] == ["neverfit"]
    started = trainctl("start", "--config", "good.toml", env=env, cwd=tmp_path)
    try:
        assert started.returncode == ExitCode.OK, started.stdout + started.stderr
        st = status("neverfit", env, tmp_path)
        assert st["crashes"] == [] and st["restarts"] == 0 and st["report"] is None
        assert [e["data"].get("failure") for e in events(run_dir, "exit")] == []
        assert [e["attempt"] for e in events(run_dir, "spawn")] == [1]
        assert not list((run_dir / "evidence").glob("*.error.json"))
    finally:
        st = status("neverfit", env, tmp_path)
        end({st["supervisor_pid"], st["worker_pid"]}, run_dir)


def test_a_run_name_means_the_run_not_a_folder_here_and_a_shared_name_is_ambiguous(tmp_path, dataset, env, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", env["XDG_STATE_HOME"])
    found = {}
    for place in ("a", "b"):
        (tmp_path / place).mkdir()
        found[place] = make_run(tmp_path / place, "oneclass", config_text("oneclass", dataset))
    work = tmp_path / "work"
    (work / "oneclass" / "images").mkdir(parents=True)      # a data folder named like the run
    remember(found["a"])
    st = trainctl("status", "oneclass", "--json", env=env, cwd=work)
    assert st.returncode == ExitCode.OK, st.stderr
    assert json.loads(st.stdout)["run_dir"] == str(found["a"])
    remember(found["b"])
    both = trainctl("status", "oneclass", env=env, cwd=work)
    assert both.returncode == ExitCode.USAGE and "ambiguous" in both.stderr, both.stderr
    assert str(found["a"]) in both.stderr and str(found["b"]) in both.stderr
    st = trainctl("status", str(found["b"]), "--json", env=env, cwd=work)     # a folder is never ambiguous
    assert json.loads(st.stdout)["run_dir"] == str(found["b"])
    here = trainctl("status", "./oneclass", env=env, cwd=work)
    assert here.returncode == ExitCode.NOT_FOUND and "not a trainctl run" in here.stderr


def subcommands(parser) -> dict:
    """Every parser under `parser`, by its command line ('trainctl service install', ...)."""
    found = {parser.prog: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(subcommands(sub))
    return found


def test_help_describes_every_command_and_argument_and_lists_the_exit_codes(tmp_path, env):
    version = trainctl("--version", env=env, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"trainctl {importlib.metadata.version('trainctl')}"
    for prog, parser in subcommands(build_parser()).items():
        assert parser.description, f"{prog} has no description"
        for action in parser._actions:
            assert action.help, f"{prog}: {action.dest} has no help"
    top = trainctl("--help", env=env, cwd=tmp_path).stdout
    for code in (0, 1, 2, 3, 4, 5, 6, 7, 70, 130):
        assert re.search(rf"^\s+{code}\s+\w", top, re.M), f"exit code {code} is not in trainctl --help"
    assert "default: the most recent run" in trainctl("logs", "--help", env=env, cwd=tmp_path).stdout


def column(table: str, index: int) -> str:
    """The text of one column of a rich table, its folded lines joined."""
    return "".join(line.split("│")[index].strip() for line in table.splitlines() if line.count("│") >= 3)


def test_list_folds_long_names_and_folders_and_gives_json(tmp_path, dataset, env, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", env["XDG_STATE_HOME"])
    names = ["a-run-with-a-long-descriptive-name-eva02-base-birds-224-lr5e5", "short"]
    dirs = [make_run(tmp_path, name, config_text(name, dataset)) for name in names]
    for run_dir in dirs:
        remember(run_dir)
    narrow = trainctl("list", env={**env, "COLUMNS": "80"}, cwd=tmp_path)
    assert narrow.returncode == 0 and "…" not in narrow.stdout, narrow.stdout
    assert all(len(line) <= 80 for line in narrow.stdout.splitlines())
    assert column(narrow.stdout, 1) == "".join(reversed(names))          # most recent first, every letter
    assert column(narrow.stdout, -2) == "".join(str(d) for d in reversed(dirs))
    listed = json.loads(trainctl("list", "--json", env=env, cwd=tmp_path).stdout)
    assert [(r["run_name"], r["run_dir"]) for r in listed] == [(n, str(d)) for n, d in zip(reversed(names), reversed(dirs))]
    for st in listed:
        check_schema(st)
