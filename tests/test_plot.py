"""The run's figure (`trainctl plot`, the report's picture): what it is drawn from, for a real run with a crash and
a step-down, the PNG the command writes, and the line said instead when matplotlib is not installed."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import config_text, events, make_run
from rich.console import Console

from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import ExitCode
from trainctl.supervisor.plot import FIGURE_FILE, Clock, Gap, Redone, lifetimes, plot_data, split_redone, timeline
from trainctl.supervisor.plot import attempts_of, crashes_of, headline, redone_of
from trainctl.supervisor.report import summarize
from trainctl.supervisor.status import gather
from trainctl.supervisor.view import render_status

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INSTALL = 'pip install "trainctl[plot]"'
# 24 steps (6 an epoch); attempt 1 is killed at step 10, attempt 2 runs out of memory at step 16 on rung 1 and the
# run steps down to rung 2 (batch 4 x accumulation 2), where attempt 3 finishes.
FAULTS = "train_step:sigkill@10:once,train_step:mps_oom@16:rung1"


def cli(*args, cwd, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "TRAINCTL_FAULTS": "", **(env or {})}
    return subprocess.run([sys.executable, "-c", "from trainctl.supervisor.cli import main; raise SystemExit(main())",
                           *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking its signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def without_matplotlib(tmp_path: Path) -> dict:
    """An environment where `import matplotlib` fails, as it does when the extra is not installed."""
    fake = tmp_path / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named \'matplotlib\' (simulated)")\n')
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, dataset) -> Path:
    """A real supervised run with a SIGKILL on rung 1, then an out-of-memory error and a step-down to rung 2."""
    tmp = tmp_path_factory.mktemp("plot")
    run_dir = make_run(tmp, "pictured", config_text("pictured", dataset, train={"epochs": 4}))
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                            env={**os.environ, "TRAINCTL_FAULTS": FAULTS}, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def raw_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_figure_data_marks_each_crash_its_redone_steps_and_the_rung_change(crashed_run):
    spawns = events(crashed_run, Event.SPAWN)
    assert len(spawns) == 3
    resumed = [s["step"] for s in spawns[1:]]   # where attempts 2 and 3 began: their newest checkpoint
    assert resumed[0] < 10, resumed   # the SIGKILL lost the steps after the last checkpoint

    data = plot_data(crashed_run)

    assert data.state == "succeeded" and data.run_name == "pictured" and data.total_steps == 24
    assert [(c.step, c.kind, c.attempt, c.rung) for c in data.crashes] == [(10, "killed", 1, 1), (16, "oom", 2, 1)]
    # (a caught out-of-memory error may checkpoint its own step on the way out: then it loses nothing)
    assert data.redone == [Redone(resumed[0], 10, 1)] + ([Redone(resumed[1], 16, 2)] if resumed[1] < 16 else [])
    [change] = data.rung_changes
    assert (change.step, change.attempt, change.from_rung, change.to_rung, change.rung) == (resumed[1], 3, 1, 2,
                                                                                             "cpu batch 4")
    assert change.reason.startswith("oom:") and "MPS backend out of memory" in change.reason, change.reason
    # Re-done steps are logged twice in metrics.jsonl, and drawn once: the curve holds, for each step, the line of
    # the attempt whose weights went on into the model; the earlier lines are the discarded series.
    train = [m for m in raw_metrics(crashed_run) if m["kind"] == "train"]
    assert len(train) > len({m["step"] for m in train})
    curve = [(m["step"], m["attempt"]) for m in data.train]
    assert [s for s, _ in curve] == list(range(2, 25, 2))
    assert all(a == (1 if s <= resumed[0] else 2 if s <= resumed[1] else 3) for s, a in curve), curve
    assert sorted((m["attempt"], m["step"]) for m in data.discarded) == sorted(
        (m["attempt"], m["step"]) for m in train
        if (m["attempt"] == 1 and m["step"] > resumed[0]) or (m["attempt"] == 2 and m["step"] > resumed[1]))
    assert [m["step"] for m in data.val] == [6, 12, 18, 24]
    # The supervised time: training, the work lost to each crash, the restarts; crashes in order on it.
    kinds = {s.kind for s in data.timeline}
    assert {"start-up", "training", "re-done", "restart"} <= kinds, kinds
    assert 0 < data.crashes[0].at < data.crashes[1].at <= max(s.end for s in data.timeline)


def test_the_headline_counts_the_steps_done_not_the_last_logged_one(crashed_run):
    """Metrics lines come every log_every_steps: a run that ended at 192/192 logged its last line at 190 (seen
    in the demo's figure). The title and `trainctl plot` say the heartbeat's step."""
    data = plot_data(crashed_run)
    logged_earlier = dataclasses.replace(data, train=[m for m in data.train if m["step"] <= 20])
    assert headline(logged_earlier) == "step 24/24, 2 crashes (killed, oom), 1 rung change"


def test_the_report_embeds_the_figure_and_status_says_where_it_is(crashed_run):
    report = (crashed_run / "report.md").read_text()
    assert f"]({FIGURE_FILE})" in report and "not drawn" not in report, report
    width, height = png_size(crashed_run / FIGURE_FILE)
    assert width >= 800 and height >= 800
    assert json.loads((crashed_run / "report.json").read_text())["figure"] == FIGURE_FILE
    console = Console(record=True, width=250)
    console.print(render_status(gather(crashed_run)))
    assert f"figure  {crashed_run / FIGURE_FILE}" in console.export_text()


def test_plot_writes_a_png(crashed_run, tmp_path):
    result = cli("plot", str(crashed_run), "-o", "night.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 crashes (killed, oom)" in result.stdout, result.stdout
    width, height = png_size(tmp_path / "night.png")
    assert width >= 800 and height >= 800 and (tmp_path / "night.png").stat().st_size > 20_000


def test_without_matplotlib_plot_says_how_to_get_it_and_the_report_is_still_written(crashed_run, tmp_path):
    env = without_matplotlib(tmp_path)
    result = cli("plot", str(crashed_run), "-o", "night.png", cwd=tmp_path, env=env)
    assert result.returncode == ExitCode.REFUSED, result.stdout + result.stderr
    said = (result.stdout + result.stderr).strip()
    assert len(said.splitlines()) == 1 and INSTALL in said, said
    assert not (tmp_path / "night.png").exists()
    # The supervisor writes the morning report in a process where drawing is impossible: the report is complete.
    copy = tmp_path / "copy"
    shutil.copytree(crashed_run, copy, ignore=shutil.ignore_patterns("checkpoints", "*.safetensors", FIGURE_FILE))
    write = ("import sys; from pathlib import Path; from trainctl.supervisor import report; "
             "report.write(Path(sys.argv[1]), 'succeeded', None, 0.5)")
    result = subprocess.run([sys.executable, "-c", write, str(copy)], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = (copy / "report.md").read_text()
    assert "- crashes: 2" in report and "matplotlib is not installed" in report and INSTALL in report, report
    assert "](" not in report and not (copy / FIGURE_FILE).exists()
    assert json.loads((copy / "report.json").read_text())["figure"] is None


def line(attempt: int, step: int) -> dict:
    return {"kind": "train", "attempt": attempt, "step": step, "loss": 1.0}


def test_a_step_trained_again_is_drawn_once_from_the_attempt_that_trained_it_last():
    lines = [line(1, 2), line(1, 4), line(1, 6), line(2, 6), line(2, 8), line(3, 4), line(3, 6), line(3, 8)]
    # attempt 2 resumed from step 4 (attempt 1's step 6 is lost), attempt 3 from step 2 (an older checkpoint)
    curve, discarded = split_redone(lines, {1: 0, 2: 4, 3: 2})
    assert [(m["step"], m["attempt"]) for m in curve] == [(2, 1), (4, 3), (6, 3), (8, 3)]
    assert sorted((m["attempt"], m["step"]) for m in discarded) == [(1, 4), (1, 6), (2, 6), (2, 8)]


def ev(t: float, kind: str, attempt: int | None = None, step: int | None = None, **data) -> dict:
    return {"time": float(t), "kind": kind, "attempt": attempt, "rung": 0, "step": step, "data": data}


def test_the_time_panel_leaves_out_the_hours_no_supervisor_ran():
    """A run failed at t=100 and was resumed by hand eleven hours later: the wait is a gap, not a restart."""
    night = [ev(0, "supervisor_start"), ev(0, "spawn", 1), ev(10, "worker_ready", 1, 0), ev(70, "checkpoint", 1, 6),
             ev(100, "exit", 1, 9, failure="diverged"), ev(101, "state", 1, to="failed"),
             ev(40_000, "supervisor_start"), ev(40_002, "spawn", 2, 6), ev(40_012, "worker_ready", 2, 6),
             ev(40_100, "exit", 2, 20, failure="done"), ev(40_101, "state", 2, to="succeeded")]
    clock = Clock(lifetimes(night, []))
    spans = timeline(attempts_of(night, []), clock)
    assert clock.gaps() == [Gap(101, 40_000 - 101)]
    assert [(s.kind, s.start, s.end) for s in spans] == [
        ("start-up", 0, 10), ("training", 10, 70), ("re-done", 70, 100), ("restart", 100, 103),
        ("restart", 103, 113), ("training", 113, 201)]


def test_a_crash_that_checkpointed_its_own_step_loses_no_time_in_the_report_or_the_figure():
    """A caught out-of-memory error checkpoints the step it reached on its way out: the next attempt resumes
    there, and nothing of the attempt is trained again — neither the report nor the time panel may say so."""
    night = [ev(0, "supervisor_start"), ev(0, "spawn", 1), ev(10, "worker_ready", 1, 0), ev(40, "checkpoint", 1, 12),
             ev(60, "exit", 1, 16, failure="oom"), ev(60, "step_down", 1, **{"from": 0, "to": 1, "reason": "oom"}),
             ev(61, "spawn", 2, 16), ev(70, "worker_ready", 2, 16), ev(100, "exit", 2, 24, failure="done"),
             ev(101, "state", 2, to="succeeded")]
    s = summarize(night)
    assert s["redone_seconds"] == 0 and s["training_seconds"] == (60 - 10) + (100 - 70)
    attempts = attempts_of(night, [])
    assert "re-done" not in {span.kind for span in timeline(attempts, Clock(lifetimes(night, [])))}
    assert redone_of(attempts) == [] and [c.step for c in crashes_of(attempts, Clock(lifetimes(night, [])))] == [16]
