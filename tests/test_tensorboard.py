"""[logging] tensorboard: event files read back as TensorBoard reads them — each step once after a crash, the
values of metrics.jsonl, the crash where training resumed — and one clear line when the package is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import assert_same_weights, config_text, events, make_run

from trainctl.contract import config as configlib
from trainctl.contract.config import ConfigError
from trainctl.contract.fixed import identity, resume_changes
from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import ExitCode
from trainctl.contract.runfolder import METRICS_FILE, TENSORBOARD_DIR, error_json_path
from trainctl.supervisor.journal import Journal
from trainctl.worker.tensorboard_log import Board, resume_note

TENSORBOARD_ON = "\n[logging]\ntensorboard = true\n"
KILLED_AT = 10   # of 18 steps, logged every 2: resumed from step 9, so the step-10 line is logged twice


def board_config(name: str, dataset, **sections) -> str:
    return config_text(name, dataset, **sections) + TENSORBOARD_ON


def read_board(run_dir):
    """The run's event files as TensorBoard shows them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    board.Reload()
    return board


def final_train_metrics(run_dir) -> dict[int, dict]:
    """metrics.jsonl's train lines, the last one of each step (a re-done step's line replaces the older one)."""
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return {rec["step"]: rec for rec in lines if rec["kind"] == "train"}


def test_a_crashed_run_shows_each_step_once_and_the_crash_where_it_resumed(tmp_path, dataset, reference_run):
    """SIGKILLed at step 10 under the real supervisor, resumed from its checkpoint, finished: TensorBoard shows the
    curves of the run that made the model (bit-identical to an uninterrupted one) and says what happened."""
    # Checkpoints written in the foreground land exactly every 3 steps (a background write may start early).
    run_dir = make_run(tmp_path, "board", board_config("board", dataset, checkpoint={"async_write": False}))
    env = {**os.environ, "TRAINCTL_FAULTS": f"train_step:sigkill@{KILLED_AT}:once"}
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    assert result.returncode == 0, result.stdout
    assert_same_weights(run_dir, reference_run)   # the board touched neither the RNG nor the math
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["attempt"] for r in lines if r["kind"] == "train" and r["step"] == KILLED_AT] == [1, 2]   # re-done
    resumed_from = [e["step"] for e in events(run_dir, Event.SPAWN) if e["attempt"] == 2][0]
    assert resumed_from == 9

    board = read_board(run_dir)
    final = final_train_metrics(run_dir)
    loss = board.Scalars("train/loss")
    steps = [e.step for e in loss]
    assert len(steps) == len(set(steps)), f"steps shown twice: {steps}"
    assert steps == sorted(final)
    assert [e.value for e in loss] == pytest.approx([final[s]["loss"] for s in steps], rel=1e-6)
    assert [e.value for e in board.Scalars("train/rung")] == [1] * len(steps)
    assert [e.step for e in board.Scalars("val/accuracy")] == [6, 12, 18]
    assert {"train/accuracy", "train/lr", "train/images_per_sec", "memory/rss_mib"} <= set(board.Tags()["scalars"])

    [tag] = [t for t in board.Tags()["tensors"] if t.startswith("crashes")]
    [note] = board.Tensors(tag)
    text = note.tensor_proto.string_val[0].decode()
    assert note.step == resumed_from, text
    assert text.startswith(f"attempt 2 resumed from step {resumed_from} after: killed (SIGKILL) at step {KILLED_AT} "
                           f"on rung 1"), text


def test_start_refuses_tensorboard_without_the_package_in_one_line(tmp_path, dataset):
    """`trainctl start` runs the pre-flight: a missing package is one line, before a run folder exists."""
    shim = tmp_path / "shim" / "tensorboard"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'tensorboard'\")\n")
    (tmp_path / "tb.toml").write_text(board_config("nopackage", dataset))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shim"), "XDG_STATE_HOME": str(tmp_path / "state"),
           "TRAINCTL_FAULTS": ""}
    result = subprocess.run([sys.executable, "-c", "from trainctl.supervisor.cli import main; raise SystemExit(main())",
                             "start", "--config", "tb.toml"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == ExitCode.BAD_CONFIG, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "[logging] tensorboard = true, but TensorBoard cannot be imported" in result.stderr, result.stderr
    assert "Fix: pip install \"trainctl[tensorboard]\"" in result.stderr, result.stderr
    assert not (tmp_path / "runs" / "nopackage").exists()


def test_a_worker_without_the_package_says_so_once_and_trains_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # what an uninstalled package gives
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    board = Board.open(True, tmp_path, 0)
    board.scalars(2, {"train/loss": 1.0})
    board.close()
    out = capsys.readouterr().out
    assert not board.on and not (tmp_path / TENSORBOARD_DIR).exists()
    assert out.count("\n") == 1 and "TensorBoard cannot be imported" in out and "training goes on" in out, out


class FullDisk:
    """A writer whose every write fails as on a full disk."""

    def __init__(self):
        self.closed = 0

    def add_scalar(self, tag, value, step):
        raise OSError(28, "No space left on device")

    add_text = add_scalar

    def flush(self):
        pass

    def close(self):
        self.closed += 1


def test_a_failing_writer_is_said_once_and_logging_stops(capsys):
    writer = FullDisk()
    board = Board(writer)
    for step in (2, 4, 6):
        board.scalars(step, {"train/loss": 1.0})
        board.text(step, "note")
    board.close()
    out = capsys.readouterr().out
    assert out.count("TensorBoard logging stopped") == 1 and "No space left on device" in out, out
    assert not board.on and writer.closed == 1


def test_logging_is_off_by_default_and_may_change_on_resume(tmp_path, dataset):
    off = tmp_path / "off.toml"
    off.write_text(config_text("cfg", dataset))
    on = tmp_path / "on.toml"
    on.write_text(board_config("cfg", dataset))
    frozen, edited = configlib.load(off), configlib.load(on)
    assert not frozen.logging.tensorboard and edited.logging.tensorboard
    off_board = Board.open(frozen.logging.tensorboard, tmp_path, 5)   # off: nothing written, nothing said
    off_board.scalars(6, {"train/loss": 1.0})
    assert not off_board.on and not (tmp_path / TENSORBOARD_DIR).exists()
    assert resume_changes(frozen, edited) == [] and identity(frozen) == identity(edited)   # not the run's identity
    frozen_copy = tmp_path / "frozen.toml"
    frozen_copy.write_text(configlib.to_toml(edited))
    assert configlib.load(frozen_copy).logging.tensorboard   # the run folder's copy keeps it
    on.write_text(config_text("cfg", dataset) + "\n[logging]\ntensorboard = \"yes\"\n")
    with pytest.raises(ConfigError, match=r"\[logging\]\.tensorboard must be true or false"):
        configlib.load(on)


def test_the_resume_note_says_how_the_attempt_before_ended(tmp_path):
    """From the supervisor's journal when there is one; from the evidence files of a worker run by hand."""
    assert resume_note(tmp_path, 1, 0, resumed=False) is None
    error_json_path(tmp_path, 2).parent.mkdir(parents=True)
    error_json_path(tmp_path, 2).write_text(json.dumps({"kind": "oom", "message": "CUDA out of memory.\nmore", "step": 31}))
    by_hand = resume_note(tmp_path, 3, 30, resumed=True)
    assert by_hand == "attempt 3 resumed from step 30 after: oom at step 31: CUDA out of memory.", by_hand
    assert "attempt 3 ended without a report" in resume_note(tmp_path, 4, 0, resumed=False)

    journal = Journal(tmp_path)
    journal.record(Event.EXIT, 2, 0, 31, failure="oom", signal=None, detail="CUDA out of memory")
    journal.record(Event.EXIT, 3, 1, 47, failure="killed", signal="SIGKILL", detail="SIGKILL with no sign of memory pressure")
    journal.close()
    assert resume_note(tmp_path, 4, 40, resumed=True) == ("attempt 4 resumed from step 40 after: killed (SIGKILL) at step 47 "
                                                          "on rung 2 — SIGKILL with no sign of memory pressure")
    stepped_down = resume_note(tmp_path, 3, 30, resumed=True, rung_index=1)
    assert stepped_down.endswith("oom at step 31 on rung 1 — CUDA out of memory; now on rung 2"), stepped_down
