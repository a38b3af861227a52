"""A rung of K data-parallel processes (issue 19): torchrun's agent and K = 2 ranks over Gloo on the CPU, real
processes, real signals, the ranks' real collectives. The rules without processes are tested first."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from conftest import (assert_same_weights, config_text, events, finish, make_run, max_weight_difference,
                      start_supervisor, wait_for, weights)

from trainctl.contract.config import ConfigError, Profile, default_ladder, load
from trainctl.contract.faults import parse
from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import read_heartbeat
from trainctl.contract.runfolder import newest_checkpoint
from trainctl.supervisor.process import run_processes
from trainctl.supervisor.runstate import read_state
from trainctl.supervisor.status import gather
from trainctl.worker.data import eval_keys, train_keys
from trainctl.worker.dist import check_group
from trainctl.worker.group import first_failure

GROUP = {"device": "cpu", "batch_size": 4, "nproc_per_node": 2}   # 4 images x 2 processes x accum 2 = 16
ONE = {"device": "cpu", "batch_size": 4}                           # 4 images x accum 4 = 16
EPOCHS = {"epochs": 6}                                             # 36 steps of the tests' 96 images


def group_config(name: str, dataset, profiles=(GROUP, ONE), **sections) -> str:
    return config_text(name, dataset, train=EPOCHS, profiles=list(profiles), **sections)


def crashes(run_dir) -> list[dict]:
    return [e["data"] for e in events(run_dir, Event.EXIT) if e["data"]["failure"] not in ("done", "stopped")]


@pytest.fixture(scope="module")
def group_reference(tmp_path_factory, dataset):
    """One uninterrupted supervised run on a group of two: what a group's recovered runs must equal."""
    run_dir = make_run(tmp_path_factory.mktemp("group-reference"), "group-reference",
                       group_config("group-reference", dataset))
    out = finish(start_supervisor(run_dir))
    assert read_state(run_dir).state == "succeeded", out
    return run_dir


# ---- the rules ---------------------------------------------------------------------------------------------------
def test_a_group_rung_takes_its_share_of_every_effective_batch(tmp_path, dataset):
    cfg = load_text(tmp_path, group_config("shares", dataset))
    assert cfg.grad_accum(0) == 2 and cfg.grad_accum(1) == 4
    assert cfg.rung_text(0) == "cpu x2 batch 4 x accum 2"
    # each rank takes every other micro-batch of 4: together, the very micro-batches of one process of batch 8
    ranks = [list(train_keys(0, 16, 1, 3, 16, 4, (r * 4, 8))()) for r in range(2)]
    assert ranks == [[(0, 16), (0, 24), (0, 32), (0, 40)], [(0, 20), (0, 28), (0, 36), (0, 44)]]
    assert sorted(ranks[0] + ranks[1]) == list(train_keys(0, 16, 1, 3, 16, 4)())
    shares = [list(eval_keys(10, 4, (r * 4, 8))()) for r in range(2)]
    assert shares == [[(0, 0), (0, 8)], [(0, 4)]]   # the padded tail once, in one rank


@pytest.mark.parametrize("profile, words", [
    ({"device": "cpu", "batch_size": 4, "nproc_per_node": 3}, "x batch_size 4 = 12 images per micro-batch does not divide"),
    ({"device": "mps", "batch_size": 2, "nproc_per_node": 2}, "MPS has no multi-process backend"),
    ({"device": "cpu", "batch_size": 4, "nproc_per_node": 0}, "nproc_per_node"),
])
def test_a_group_that_cannot_keep_the_effective_batch_is_refused(tmp_path, dataset, profile, words):
    with pytest.raises(ConfigError, match="nproc_per_node") as e:
        load_text(tmp_path, group_config("refused", dataset, profiles=[profile]))
    assert words in str(e.value)


def test_a_group_on_mps_or_on_more_gpus_than_visible_is_refused(monkeypatch):
    """The device checks of the pre-flight and of each rank (no GPU here: the count is simulated)."""
    group = Profile(device="auto", batch_size=4, nproc_per_node=2)
    with pytest.raises(ConfigError, match="no multi-process backend"):
        check_group(group, torch.device("mps"))   # "auto" on a Mac
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="nproc_per_node = 2 on CUDA, but 1 GPU"):
        check_group(group, torch.device("cuda"))
    check_group(group, torch.device("cpu"))
    check_group(Profile(device="mps", batch_size=2), torch.device("mps"))


def test_the_derived_ladder_starts_with_every_gpu():
    ladder = default_ladder("cuda", 64, gpus=4)
    assert [(p.batch_size, p.nproc_per_node) for p in ladder[:3]] == [(16, 4), (32, 2), (32, 1)]
    assert ladder[-1] == Profile(device="cpu", batch_size=4)
    assert default_ladder("cuda", 64, gpus=1) == default_ladder("cuda", 64)


def test_faults_can_name_a_rank():
    spec = "train_step:sigkill@5:once:rank1,boot:exception:rung2:rank0"
    assert [r.action for r in parse(spec, 0, rank=1)] == ["sigkill"]
    assert [r.once for r in parse(spec, 1, rank=0)] == [False] and parse(spec, 0, rank=0) == []


def test_the_first_failure_is_not_a_rank_that_only_saw_its_peer_go():
    ends = {0: (70, 10, 1.0), 1: (-9, 11, 2.0)}   # rank 0's error came first, but it says the peer went away
    assert first_failure(ends, {0: {"collective": True}, 1: None}) == 1
    assert first_failure(ends, {0: {"collective": False}, 1: None}) == 0
    assert first_failure({0: (75, 1, 3.0), 1: (75, 2, 3.0)}, {}) == 0   # a stop: every rank alike


def load_text(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load(path)


# ---- real groups ---------------------------------------------------------------------------------------------------
def test_a_group_killed_in_each_of_its_processes_ends_bit_identical(tmp_path, dataset, group_reference):
    """An exception in rank 1, SIGKILLs of rank 1, of rank 0 and of torchrun's agent: every attempt classified
    (naming the rank that failed first), each resumed from a checkpoint, the model bit-identical to the
    uninterrupted group's."""
    run_dir = make_run(tmp_path, "group-kills", group_config("group-kills", dataset))
    faults = ("train_step:exception@3:once:rank1,train_step:sigkill@10:once:rank1,train_step:sigkill@17:once:rank0,"
              "train_step:sigkill_parent@25:once:rank0")
    out = finish(start_supervisor(run_dir, faults))
    assert read_state(run_dir).state == "succeeded", out
    found = [(c["failure"], c.get("rank")) for c in crashes(run_dir)]
    assert found == [("exception", 1), ("killed", 1), ("killed", 0), ("killed", None)], out
    assert [c["rank"] for c in gather(run_dir).to_json()["crashes"]] == [1, 1, 0, None]   # status --json names it
    error = json.loads((run_dir / "evidence" / "attempt-001.error.json").read_text())
    assert error["rank"] == 1 and "injected fault" in error["traceback"]
    ranks = crashes(run_dir)[0]["ranks"]   # rank 0's broken collective is kept as evidence, not as the cause
    assert ranks[0]["collective"] and not ranks[1].get("collective"), ranks
    spawns = events(run_dir, Event.SPAWN)
    assert len(spawns) == 5 and all(s["step"] for s in spawns[1:])
    assert_same_weights(run_dir, group_reference)
    assert not any(k.startswith("module.") for k in weights(run_dir / "model.safetensors"))   # timm's plain names
    assert wait_for(lambda: not run_processes(run_dir), 30, what="every process of the run gone")


def test_no_process_of_a_group_outlives_its_supervisor_and_a_stop_stops_every_rank(tmp_path, dataset, group_reference):
    """SIGKILL the supervisor of a training group: the agent tells the ranks, they stop at a checkpoint and every
    process (agent, ranks, the rendezvous store in the agent) is gone. A new supervisor resumes; a stop request
    (SIGTERM, as `trainctl stop` sends) stops every rank after the same step; a third one finishes the run."""
    run_dir = make_run(tmp_path, "group-orphan", group_config("group-orphan", dataset))
    proc = start_supervisor(run_dir)
    try:
        wait_for(lambda: (hb := read_heartbeat(run_dir)) and hb.ranks and hb.step >= 4, 120, what="the group training")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not run_processes(run_dir), 60, what="every process of the group gone")
    finally:
        proc.kill()
    stopped = stopped_at_a_checkpoint(run_dir)   # the ranks stopped together, at a durable checkpoint
    assert stopped.step >= 4
    proc = start_supervisor(run_dir)
    try:
        wait_for(lambda: (hb := read_heartbeat(run_dir)) and hb.attempt == 2 and hb.step >= stopped.step + 3, 120,
                 what="the resumed group training")
        proc.send_signal(signal.SIGTERM)
        out = finish(proc)
    finally:
        proc.kill()
    assert read_state(run_dir).state == "stopped", out
    again = stopped_at_a_checkpoint(run_dir)
    assert again.step > stopped.step, out
    assert events(run_dir, Event.SPAWN)[-1]["step"] == stopped.step
    out = finish(start_supervisor(run_dir))
    assert read_state(run_dir).state == "succeeded", out
    assert events(run_dir, Event.SPAWN)[-1]["step"] == again.step
    assert not crashes(run_dir), out
    assert_same_weights(run_dir, group_reference)


def stopped_at_a_checkpoint(run_dir):
    """The newest checkpoint, once rank 0 has said that the group stopped at its very step (it says so after the
    checkpoint is durable and every rank has reached the barrier). A stop at an epoch's last step, or right after an
    interval checkpoint of that step, writes no second one: its reason is then "epoch" or "interval", not "stop"."""
    newest = newest_checkpoint(run_dir)
    log = (run_dir / "logs" / "worker.log").read_text()
    assert f"stopped at step {newest.step} (" in log, log[-3000:]
    return newest


def test_a_hang_in_one_rank_is_seen_with_every_ranks_stacks_and_status_shows_the_ranks(tmp_path, dataset):
    run_dir = make_run(tmp_path, "group-hang", group_config(
        "group-hang", dataset, supervisor={"hang_timeout_seconds": 10, "backoff_seconds": [0.1], "poll_seconds": 0.1}))
    proc = start_supervisor(run_dir, "train_step:hang@4:once:rank1")
    try:
        status = wait_for(lambda: group_status(run_dir), 120, what="status to list the group's ranks")
        out = finish(proc)
    finally:
        proc.kill()
    assert [(r["rank"], r["device"]) for r in status["ranks"]] == [(0, "cpu"), (1, "cpu")], status
    assert status["rung"]["nproc_per_node"] == 2
    assert [c["failure"] for c in crashes(run_dir)] == ["hang"], out
    stacks = (run_dir / "evidence" / "attempt-001.fault.log").read_text()
    rank0, rank1 = stacks.split("=== rank 0")[1].split("=== rank 1")[0], stacks.split("=== rank 1")[1]
    assert "train.py" in rank0 and "faults.py" in rank1, stacks   # rank 1 hangs in the fault, rank 0 waits for it
    assert read_state(run_dir).state == "succeeded"


def group_status(run_dir) -> dict | None:
    """`trainctl status --json` of the run once it lists two ranks."""
    status = gather(run_dir).to_json()
    return status if len(status["ranks"]) == 2 else None


def test_an_oom_in_one_rank_steps_down_to_one_process_with_the_same_effective_batch(tmp_path, dataset,
                                                                                    group_reference):
    run_dir = make_run(tmp_path, "group-down", group_config("group-down", dataset))
    out = finish(start_supervisor(run_dir, "train_step:cpu_oom@31:rung1:rank1"))
    assert read_state(run_dir).state == "succeeded", out
    assert [(c["failure"], c["rank"]) for c in crashes(run_dir)] == [("oom", 1)], out
    spawns = events(run_dir, Event.SPAWN)
    assert [s["data"]["rung"]["nproc_per_node"] for s in spawns] == [2, 1] and spawns[1]["step"] == 31
    hb = read_heartbeat(run_dir)
    assert (hb.batch_size, hb.grad_accum, hb.effective_batch_size) == (4, 4, 16)
    # 5 steps on one process after 31 on two: the same updates up to float summation order
    assert max_weight_difference(run_dir / "model.safetensors", group_reference / "model.safetensors") < 1e-5


def test_every_ranks_unreadable_validation_images_are_listed(tmp_path, dataset):
    """Each rank validates its share of the images; rank 0 writes bad_images.json for all of them."""
    train, val = (shutil.copytree(d, tmp_path / "data" / d.name) for d in dataset)
    broken = sorted(p for p in (val / sorted(os.listdir(val))[-1]).iterdir())   # a whole class: both ranks' shares
    for path in broken:
        path.write_bytes(b"not an image")
    run_dir = make_run(tmp_path, "group-bad", config_text("group-bad", (train, val), train={"epochs": 1}, profiles=[GROUP, ONE]))
    out = finish(start_supervisor(run_dir))
    assert read_state(run_dir).state == "succeeded", out
    listed = json.loads((run_dir / "bad_images.json").read_text())["files"]
    assert sorted(listed) == [str(p) for p in broken], listed
