"""A diverged run is not a success: a non-finite loss skips its step, a run whose loss stays non-finite fails
`diverged` with no model, and every view of the run (status, status --json, list, the foreground display)
survives NaN and infinity wherever they appear."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import assert_same_weights, config_text, events, make_run, run_worker, weights
from rich.console import Console
from test_cli import trainctl

from trainctl.contract import fsio
from trainctl.contract.protocol import ExitCode, read_heartbeat
from trainctl.contract.runfolder import error_json_path, newest_checkpoint, read_error
from trainctl.supervisor import runstate
from trainctl.supervisor.foreground import progress_line
from trainctl.supervisor.status import gather
from trainctl.supervisor.view import render_list, render_status, sparkline

NAN, INF = float("nan"), float("inf")


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as every JSON parser but Python's does."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def render(renderable) -> str:
    console = Console(file=io.StringIO(), width=250)
    console.print(renderable)
    return console.file.getvalue()


@pytest.fixture
def env(tmp_path):
    """An isolated home for the run registry (as in test_cli)."""
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "120", "TRAINCTL_FAULTS": ""}


def test_a_run_with_a_huge_lr_fails_diverged_without_a_model_and_every_view_survives(tmp_path, dataset, env):
    run_dir = make_run(tmp_path, "huge", config_text("huge", dataset, train={"lr": 1e6}))
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == ExitCode.FAILED, result.stdout + result.stderr
    saved = runstate.read_state(run_dir)
    assert saved.state == "failed" and saved.reason.startswith("diverged: the loss is not finite since step")
    assert "3 steps in a row" in saved.reason and "Fix: start a new run" in saved.reason and "lr" in saved.reason
    assert not (run_dir / "model.safetensors").exists()
    (exit_event,) = events(run_dir, "exit")     # given up at once: restarting cannot help
    assert exit_event["data"]["failure"] == "diverged"
    assert read_heartbeat(run_dir).nonfinite_steps == 3
    # What an older trainctl wrote, or a hand: NaN and infinity in the heartbeat and the metrics log.
    beat = json.loads((run_dir / "heartbeat.json").read_text())
    fsio.atomic_write_json(run_dir / "heartbeat.json", {**beat, "loss": NAN, "lr": INF, "images_per_sec": NAN,
                                                        "val_acc": NAN, "phase": "training"})
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step, value in ((90, NAN), (91, INF), (92, -INF)):
            f.write(json.dumps({"kind": "train", "step": step, "epoch": 0.5, "loss": value, "acc": value, "lr": INF,
                                "images_per_sec": NAN}) + "\n")
        f.write(json.dumps({"kind": "val", "epoch": 1, "step": 92, "val_acc": NAN, "val_loss": NAN}) + "\n")
    st = strict_json(trainctl("status", str(run_dir), "--json", env=env, cwd=tmp_path).stdout)
    assert st["state"] == "failed" and st["loss"] is None and st["lr"] is None and st["images_per_sec"] is None
    json.dumps(gather(run_dir).to_json(), allow_nan=False)
    human = trainctl("status", str(run_dir), env=env, cwd=tmp_path)
    assert human.returncode == ExitCode.OK and "FAILED" in human.stdout and "diverged" in human.stdout, human.stderr
    listed = trainctl("list", "--json", env=env, cwd=tmp_path)
    assert [r["run_name"] for r in strict_json(listed.stdout)] == ["huge"]
    table = trainctl("list", env=env, cwd=tmp_path)
    assert table.returncode == ExitCode.OK and "huge" in table.stdout and "failed" in table.stdout, table.stderr


def test_a_skipped_step_is_the_only_difference_and_a_resume_fails_where_the_run_would_have(tmp_path, dataset):
    """Steps 5 and 6 come out NaN: skipped (no update), the run ends well; the same with a SIGKILL at step 6 and a
    resume gives bit-identical weights; a resume from step 6 whose next step is NaN too fails there: the count of
    non-finite steps in a row is in the checkpoint."""
    nan_steps = "train_step:nan_loss@4,train_step:nan_loss@5"
    synchronous = {"every_steps": 3, "async_write": False}    # checkpoints at steps 3, 6, ... exactly
    whole = make_run(tmp_path, "whole", config_text("whole", dataset, checkpoint=synchronous))
    result = run_worker(whole, faults=nan_steps)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "step 5: loss not finite, step skipped" in result.stdout and "step 6: loss not finite" in result.stdout
    assert read_heartbeat(whole).nonfinite_steps == 2
    assert all(bool(t.isfinite().all()) for t in weights(whole / "model.safetensors").values())
    logged = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss") is None or math.isfinite(r["loss"]) for r in logged)   # no NaN written

    killed = make_run(tmp_path, "killed", config_text("killed", dataset, checkpoint=synchronous))
    assert run_worker(killed, faults=f"{nan_steps},train_step:sigkill@6").returncode == -signal.SIGKILL
    assert newest_checkpoint(killed).step == 6        # taken with 2 non-finite steps in a row
    again = shutil.copytree(killed, tmp_path / "again")
    resumed = run_worker(killed, attempt=2)
    assert resumed.returncode == ExitCode.OK, resumed.stdout + resumed.stderr
    assert_same_weights(whole, killed)

    one_more = run_worker(again, attempt=2, faults="train_step:nan_loss@6")
    assert one_more.returncode == ExitCode.CANNOT_CONTINUE, one_more.stdout + one_more.stderr
    error = read_error(again, 2)
    assert error["kind"] == "diverged" and "not finite since step 5 (3 steps in a row" in error["message"]
    assert error_json_path(again, 2).exists() and not (again / "model.safetensors").exists()


def test_the_export_refuses_a_model_that_is_not_finite():
    import torch

    from trainctl.contract.protocol import CannotContinue
    from trainctl.worker.export import refuse_nonfinite
    refuse_nonfinite({"w": torch.ones(3), "steps": torch.tensor([7])}, step=18)   # finite: no complaint
    with pytest.raises(CannotContinue) as raised:
        refuse_nonfinite({"w": torch.tensor([1.0, NAN]), "b": torch.tensor([INF]), "ok": torch.zeros(2)}, step=18)
    assert raised.value.kind == "diverged"
    assert "step 18" in str(raised.value) and "2 of the model's 3 tensors" in str(raised.value)
    assert "w, b" in str(raised.value) and "Fix:" in str(raised.value)


def test_views_survive_any_value():
    assert sparkline([1.0, NAN, 2.0, INF, -INF, None, 3.0]) == sparkline([1.0, 2.0, 3.0])
    assert sparkline([NAN, INF]) == ""
    hb = None
    line = progress_line({"kind": "train", "step": 3, "epoch": 0.5, "loss": NAN, "acc": None, "images_per_sec": INF},
                         hb, None)
    assert "loss not finite" in line and "acc —" in line
    assert "top-1 —" in progress_line({"kind": "val", "epoch": 1, "val_acc": None}, hb, None)


def test_status_of_a_folder_full_of_nan_renders_and_is_strict_json(tmp_path, dataset):
    run_dir = make_run(tmp_path, "nan", config_text("nan", dataset))
    fsio.atomic_write_json(run_dir / "heartbeat.json", {
        "pid": 1, "attempt": 1, "rung_index": 0, "beat": 5, "phase": "training", "step": 3, "total_steps": 18,
        "epochs": 3, "effective_batch_size": 16, "loss": NAN, "lr": INF, "images_per_sec": INF, "val_acc": NAN})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"kind": "train", "step": 2, "loss": NAN, "acc": INF}, {"kind": "val", "epoch": 1, "val_acc": -INF})))
    st = gather(run_dir)
    json.dumps(st.to_json(), allow_nan=False)
    assert st.loss is None and st.eta_seconds is None and st.metrics == {"loss": [None], "acc": [None], "val_acc": [None]}
    assert "loss" in render(render_status(st)) and "nan" in render(render_list([st]))
    # What the live display gets if a value slips through: it renders (rich's refresh thread would die on an error).
    raw = dataclasses.replace(st, state="running", images_per_sec=NAN, eta_seconds=INF, loss=NAN,
                              metrics={"loss": [1.0, NAN, INF], "acc": [NAN], "val_acc": [-INF]})
    text = render(render_status(raw))
    assert "not finite" in text and "images/s" not in text


def test_the_model_file_follows_the_umask_like_every_other_file(tmp_path):
    """model.safetensors is written by safetensors, which creates its file 0600; the export's writer gives it
    the mode every other file of the run gets (0640 under umask 027, 0644 under 022)."""
    import torch
    from safetensors.torch import save_file
    before = os.umask(0o027)
    try:
        fsio.atomic_write_by_name(tmp_path / "model.safetensors",
                                  lambda tmp: save_file({"w": torch.ones(2)}, str(tmp)))
        fsio.atomic_write(tmp_path / "labels.json", "{}")
    finally:
        os.umask(before)
    assert oct((tmp_path / "model.safetensors").stat().st_mode & 0o777) == oct(0o640)
    assert (tmp_path / "labels.json").stat().st_mode & 0o777 == 0o640
