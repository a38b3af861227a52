"""The Python API (`import trainctl`): the CLI's operations and errors from Python, through real processes."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
from conftest import LONG, config_text, make_run, wait_for
from test_cli import end

import trainctl
from trainctl.contract.protocol import ExitCode
from trainctl.supervisor import cli, runstate, terminal
from trainctl.supervisor.runs import remember

# A notebook's kernel: starts a run from a dict, says so, and lives until it is killed.
KERNEL = """
import json, sys, time
import trainctl
run = trainctl.start(json.loads(sys.argv[1]), name=sys.argv[2])
print("FOLDER", run.folder, flush=True)
time.sleep(600)
"""
CHANGING = ("last_seen_seconds", "last_checkpoint")   # ages: they grow between two looks


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An isolated run registry for this process and the ones it starts; tmp_path is the current folder."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("TRAINCTL_FAULTS", "")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config_dict(name: str, dataset, **sections) -> dict:
    """The tests' config as the dict a notebook would write (its runs_dir "runs" is relative: to the current folder)."""
    return tomllib.loads(config_text(name, dataset, **sections))


def cli_says(args: list[str], capsys) -> tuple[int, str, str]:
    """`trainctl ARGS` in this process: its exit code, stdout and stderr."""
    capsys.readouterr()
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


class Cell:
    """A stand-in for a Jupyter cell's output (`IPython.display`: none is installed here): what it shows, in order."""

    def __init__(self):
        self.shown = []

    def display(self, obj, display_id=False):
        self.shown.append(obj)
        return self            # the display handle: update() replaces what the cell shows

    def update(self, obj):
        self.shown.append(obj)


def in_a_notebook(patch) -> Cell:
    """Make trainctl's console believe it runs in Jupyter, with a stand-in cell (undone with `patch`)."""
    cell, display = Cell(), types.ModuleType("IPython.display")
    display.display = cell.display
    patch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    patch.setitem(sys.modules, "IPython.display", display)
    patch.setattr(terminal.console, "is_jupyter", True)
    return cell


def test_a_run_outlives_the_process_that_started_it_and_is_driven_from_another(home, dataset, capsys, monkeypatch):
    config = config_dict("notebook", dataset, train=LONG)
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL, json.dumps(config), "api-run"], cwd=home,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = (home / "runs" / "api-run").resolve()
    try:
        said = ""
        while not said.startswith("FOLDER ") and kernel.poll() is None:   # after what `trainctl start` prints
            said = kernel.stdout.readline()
        assert said.startswith("FOLDER "), said + kernel.communicate(timeout=60)[1]
        assert Path(said.split(" ", 1)[1].strip()) == folder          # [run] name replaced, runs_dir relative to here
        kernel.kill()                                                   # SIGKILL: the kernel dies, the run goes on
        kernel.wait(timeout=60)
        run = trainctl.Run("api-run")                                   # a fresh "kernel" attaches by name
        assert run.folder == folder and run.status()["supervisor_alive"] and run.status()["state"] in ("starting", "running")
        with pytest.raises(trainctl.AlreadyRunning) as again:
            trainctl.start(config, name="api-run")
        assert again.value.exit_code == ExitCode.RUNNING and str(again.value).startswith("api-run is already running")
        with pytest.raises(trainctl.Timeout) as late:
            run.wait(timeout=0.1)
        assert late.value.exit_code == ExitCode.TIMEOUT and isinstance(late.value, TimeoutError)
        assert "api-run is still running" in str(late.value)
        wait_for(lambda: run.status()["step"] >= 2, 120, what="two steps")
        stopped = run.stop()
        assert stopped["state"] == "stopped" and stopped["last_checkpoint"]["step"] == stopped["step"] >= 2
        with pytest.raises(trainctl.NotRunning) as idle:
            run.stop()
        assert idle.value.exit_code == ExitCode.REFUSED and "not running" in str(idle.value)
        assert run.resume() is run and run.status()["state"] in ("starting", "running")
        with monkeypatch.context() as patch:                           # watched in a notebook, to its end
            cell = in_a_notebook(patch)
            watched = run.watch(interval=0.5)
        assert watched["state"] == "succeeded" and len(cell.shown) >= 2   # shown once, then updated in place
        assert "SUCCEEDED" not in cell.shown[0].title.plain and "SUCCEEDED" in cell.shown[-1].title.plain
        final = run.wait(timeout=240)
    finally:
        kernel.kill()
        saved = runstate.read_state(folder)
        end({saved.supervisor_pid, saved.worker_pid} if saved else set(), folder)
    assert final["state"] == "succeeded" and final["step"] == final["total_steps"] == 72
    code, out, _ = cli_says(["status", "api-run", "--json"], capsys)   # the same dict as `trainctl status --json`
    shown = json.loads(out)
    assert code == ExitCode.OK and shown.keys() == final.keys()
    assert {k: v for k, v in shown.items() if k not in CHANGING} == {k: v for k, v in final.items() if k not in CHANGING}
    metrics = run.metrics()
    train, val = run.metrics("train"), run.metrics("val")
    assert train and val and len(train) + len(val) == len(metrics) and train[-1]["step"] == 72
    assert len({r["epoch"] for r in val}) == 12 and len({r["attempt"] for r in train}) == 2
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "step": 7')                          # a line cut by a crash
    assert run.metrics() == metrics
    assert [r["run_name"] for r in trainctl.runs()] == ["api-run"]
    with pytest.raises(trainctl.Refused) as done:
        run.resume()
    assert done.value.exit_code == ExitCode.REFUSED and "already succeeded" in str(done.value)
    assert run.watch()["state"] == "succeeded"                          # ended: shown once, returns at once
    assert "sanity check passed" in run.logs()


def test_each_error_is_the_clis_one_line_as_an_exception(home, dataset, capsys):
    good = config_dict("errs", dataset)
    for place in ("a", "b"):
        (home / place).mkdir()
        remember(make_run(home / place, "twin", config_text("twin", dataset)))
    remember(make_run(home, "idle", config_text("idle", dataset)))
    (home / "ladder.toml").write_text(config_text("ladder", dataset))   # a ladder of 2 rungs
    same_as_cli = [   # (what the API does, its error class, exit code, the same command on the CLI)
        (lambda: trainctl.Run("nosuchrun"), trainctl.RunNotFound, ExitCode.NOT_FOUND, ["status", "nosuchrun"]),
        (lambda: trainctl.Run("twin"), trainctl.AmbiguousRun, ExitCode.USAGE, ["status", "twin"]),
        (lambda: trainctl.start("missing.toml"), trainctl.ConfigError, ExitCode.BAD_CONFIG,
         ["start", "--config", "missing.toml"]),
        (lambda: trainctl.Run("idle").stop(), trainctl.NotRunning, ExitCode.REFUSED, ["stop", "idle"]),
        (lambda: trainctl.Run("idle").resume(rung=9), trainctl.Refused, ExitCode.USAGE, ["resume", "idle", "--rung", "9"]),
        (lambda: trainctl.start(home / "ladder.toml", rung=3), trainctl.Refused, ExitCode.USAGE,
         ["start", "--config", str(home / "ladder.toml"), "--rung", "3"]),
    ]
    for call, kind, code, args in same_as_cli:
        with pytest.raises(kind) as raised:
            call()
        error = raised.value
        assert isinstance(error, trainctl.Error) and error.exit_code == code, (args, error)
        assert cli_says(args, capsys)[::2] == (code, f"{error.label}: {error}\n"), args   # the CLI's very line
    only_in_python = [   # a dict config: no file to name, the same checks
        ({**good, "train": {**good["train"], "epoch": 3}}, None, "config: unknown key [train].epoch. Did you mean 'epochs'?"),
        ({k: v for k, v in good.items() if k != "train"}, None, "config: missing section [train]. Fix: add it"),
        (good, "no/slash", "[run] name = 'no/slash'"),
    ]
    for config, name, words in only_in_python:
        with pytest.raises(trainctl.ConfigError) as raised:
            trainctl.start(config, name=name)
        assert words in str(raised.value) and raised.value.exit_code == ExitCode.BAD_CONFIG
        assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)
    assert not (home / "runs" / "errs").exists()                        # a refused start wrote nothing
    assert not (home / "runs" / "no" / "slash").exists()
    assert not (home / "runs" / "ladder").exists()


def test_importing_trainctl_loads_neither_torch_nor_the_supervisor():
    code = ("import json, sys, trainctl\n"
            "bare = sorted(m for m in sys.modules if m.startswith(('torch', 'timm', 'trainctl.')))\n"
            "trainctl.Run, trainctl.start, trainctl.runs, trainctl.ConfigError\n"
            "used = sorted(m for m in sys.modules if m.startswith(('torch', 'timm')))\n"
            "print(json.dumps([bare, used]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [[], []]
