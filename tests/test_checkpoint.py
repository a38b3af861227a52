"""Checkpoint commit rules: atomic and durable, verified on load, torn ones skipped, pickles refused."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
import zlib
from types import SimpleNamespace

import pytest
import torch

from trainctl.contract import fsio
from trainctl.contract.runfolder import checkpoint_path, committed_checkpoints, marker_path
from trainctl.worker import checkpoint
from trainctl.worker.ckptwriter import Writer


def state(step: int) -> dict:
    return {"format": checkpoint.FORMAT, "model": {"w": torch.full((256, 256), float(step))}, "step": step}


def save(folder, step, keep=3, **kw):
    return checkpoint.save(folder, step, state(step), keep, {"epoch": 0}, **kw)


def test_commit_marker_records_size_and_checksum(tmp_path):
    done = save(tmp_path, 5)
    marker = json.loads(marker_path(done.path).read_text())
    assert marker["step"] == 5 and marker["size"] == done.path.stat().st_size and len(marker["crc32"]) == 8
    loaded, found, skipped = checkpoint.load_latest(tmp_path)
    assert found.step == 5 and torch.equal(loaded["model"]["w"], state(5)["model"]["w"]) and skipped == []


def test_files_get_normal_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        done = save(tmp_path, 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(done.path.stat().st_mode) == 0o644


def test_steps_are_compared_as_numbers_and_pruned_after_commit(tmp_path):
    for step in (9, 10, 100, 11):
        save(tmp_path, step, keep=2)
    assert [c.step for c in committed_checkpoints(tmp_path)] == [11, 100]
    assert checkpoint.load_latest(tmp_path)[1].step == 100


def corrupt_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_unmark(path):
    marker_path(path).unlink()


@pytest.mark.parametrize("corrupt,reason", [(corrupt_truncate, "torn or truncated"),
                                            (corrupt_flip, "checksum mismatch"),
                                            (corrupt_unmark, "no commit marker")])
def test_torn_or_corrupt_newest_falls_back_to_the_previous(tmp_path, corrupt, reason):
    save(tmp_path, 3)
    newest = save(tmp_path, 6)
    corrupt(newest.path)
    loaded, found, skipped = checkpoint.load_latest(tmp_path)
    assert found.step == 3 and loaded["step"] == 3
    assert skipped and skipped[0][0] == newest.path.name and reason in skipped[0][1]
    if corrupt is corrupt_unmark:   # a crash between rename and marker: reported, left where it is
        assert newest.path.exists()
    else:                           # failed verification: reported and set aside with its marker, never deleted
        assert not newest.path.exists() and "moved to corrupt/" in skipped[0][1]
        assert (tmp_path / "corrupt" / newest.path.name).exists()
        assert (tmp_path / "corrupt" / marker_path(newest.path).name).exists()


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    save(tmp_path, 2)
    canary = tmp_path / "the-pickle-ran"
    path = checkpoint_path(tmp_path, 4)
    torch.save({"format": checkpoint.FORMAT, "evil": Evil(str(canary))}, path)
    import hashlib
    marker = {"step": 4, "file": path.name, "size": path.stat().st_size,
              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    marker_path(path).write_text(json.dumps(marker))   # a perfectly valid commit marker
    loaded, found, skipped = checkpoint.load_latest(tmp_path)
    assert found.step == 2
    assert "weights_only" in skipped[0][1]
    assert not canary.exists()


@pytest.mark.parametrize("phase", ["begin", "bytes", "written", "synced", "renamed", "committed", "marked"])
def test_a_failure_at_any_write_phase_keeps_the_previous_checkpoint(tmp_path, phase):
    save(tmp_path, 3)

    def boom(p):
        if p == phase:
            raise OSError(errno.EIO, "injected")

    with pytest.raises(OSError):
        save(tmp_path, 6, on_phase=boom)
    loaded, found, _ = checkpoint.load_latest(tmp_path)
    assert found.step == (6 if phase == "marked" else 3)
    assert not [n for n in os.listdir(tmp_path) if fsio.is_temp_name(n)]


def test_disk_full_is_its_own_error_and_keeps_the_previous(tmp_path, monkeypatch):
    save(tmp_path, 3)
    import shutil
    usage = type(shutil.disk_usage(tmp_path))           # the named tuple disk_usage returns
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(checkpoint.DiskFull, match=r"only 1 kB free in .*; a checkpoint needs about 17 MB$"):
        save(tmp_path, 6)
    assert checkpoint.load_latest(tmp_path)[1].step == 3


def test_enospc_mid_write_becomes_disk_full(tmp_path):
    save(tmp_path, 3)

    def full(p):
        if p == "bytes":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(checkpoint.DiskFull, match="no space left"):
        save(tmp_path, 6, on_phase=full)
    assert checkpoint.load_latest(tmp_path)[1].step == 3


def test_stale_temps_are_ours_only(tmp_path):
    (tmp_path / ".step-000000009.pt.tmp-123").write_bytes(b"half")
    (tmp_path / "users-notes.txt").write_text("keep me")
    (tmp_path / "step-000000001.pt").write_bytes(b"no marker: reported, not deleted")
    assert fsio.remove_stale_temps(tmp_path) == [".step-000000009.pt.tmp-123"]
    assert sorted(os.listdir(tmp_path)) == ["step-000000001.pt", "users-notes.txt"]


def test_large_tensors_are_checksummed_in_parallel_and_the_checksum_still_matches(tmp_path):
    big = torch.arange(3 << 20, dtype=torch.float32)   # 12 MiB: written in chunks above PARALLEL_BYTES
    done = checkpoint.save(tmp_path, 1, {"w": big, "small": torch.ones(3)}, keep_last=1, info={})
    assert checkpoint.verify(done) is None
    assert done.marker["crc32"] == f"{zlib.crc32(done.path.read_bytes()):08x}"


def test_a_background_write_of_live_tensors_holds_the_update_until_they_are_read(tmp_path):
    """The writer reads the live weights; `wait_released` must hold the optimizer step until it has.

    The write is slowed down after its first tensor; the "optimizer step" (an in-place add to the
    second tensor) waits for `wait_released`. Were it let through early, the checkpoint would hold
    the updated second tensor."""
    first, second = torch.zeros(1 << 20), torch.zeros(1 << 20)
    slowed = []

    def on_phase(phase, step):
        if phase == "bytes" and not slowed:
            slowed.append(phase)
            time.sleep(0.5)

    writer = Writer(tmp_path, keep_last=1, on_phase=on_phase, background=True)
    writer.submit(1, {"first": first, "second": second}, {}, shares_training_memory=True)
    writer.wait_released()
    second.add_(1.0)          # the optimizer step
    done = writer.wait()
    saved = torch.load(done.path, weights_only=True)
    assert slowed, "the write was never slowed: the test did not exercise the race"
    assert torch.equal(saved["second"], torch.zeros(1 << 20))
    assert torch.equal(saved["first"], torch.zeros(1 << 20))


def test_markers_written_with_sha256_still_verify(tmp_path):
    done = save(tmp_path, 3)
    marker = dict(done.marker)
    del marker["crc32"]
    marker["sha256"] = hashlib.sha256(done.path.read_bytes()).hexdigest()
    marker_path(done.path).write_text(json.dumps(marker))
    (c,) = committed_checkpoints(tmp_path)
    assert checkpoint.verify(c) is None
    marker["sha256"] = "0" * 64
    marker_path(done.path).write_text(json.dumps(marker))
    (c,) = committed_checkpoints(tmp_path)
    assert "checksum mismatch" in checkpoint.verify(c)


def test_a_write_by_name_that_fails_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError):
        fsio.atomic_write_by_name(target, fail)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    fsio.atomic_write_by_name(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"


def test_export_copies_only_tensors_that_share_storage(tmp_path, monkeypatch):
    """`export.write` hands safetensors CPU tensors, copying only those that share storage (tied weights,
    views), which safetensors refuses: never a copy of the whole model."""
    from safetensors.torch import load_file

    from trainctl.worker import export
    from trainctl.worker.images import Recipe
    from trainctl.worker.report import Reporter
    w = torch.randn(4, 4)
    state = {"embed": w, "head": w, "row": w[1], "own": torch.ones(3)}   # tied weights, a view
    handed = []
    real_save_file = export.save_file

    def spy(tensors, filename, metadata=None):
        handed.append(tensors)
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(export, "save_file", spy)
    # No timm model here, so no timm config.json (tests/test_export.py tests that part).
    monkeypatch.setattr(export, "save_config_for_hf", lambda model, path, **kwargs: open(path, "w").close())
    trainer = SimpleNamespace(   # what export.write reads of the trainer at the end of training
        run_dir=tmp_path, reporter=Reporter(tmp_path, 1, 0), optimizer=SimpleNamespace(state={"moments": 1}),
        cfg=SimpleNamespace(model=SimpleNamespace(name="tied")), train_set=SimpleNamespace(classes=("a", "b")),
        recipe=Recipe(size=32), progress=SimpleNamespace(step=7), model=SimpleNamespace(state_dict=lambda: state),
        history=[], faults=SimpleNamespace(hit=lambda point, step=None: None))
    export.write(trainer)
    (out,) = handed
    assert out["embed"].data_ptr() == w.data_ptr()                 # no copy of what stands alone
    assert out["own"].data_ptr() == state["own"].data_ptr()
    assert out["head"].data_ptr() != w.data_ptr()                  # the tied copy is its own
    loaded = load_file(str(tmp_path / "model.safetensors"))        # safetensors refuses shared storage
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_timm_folder_that_cannot_be_written_costs_the_run_nothing(tmp_path, monkeypatch):
    """model/ in timm's format is a convenience: a timm whose save_config_for_hf lacks `data_config` (older
    versions) or a model argument timm cannot serialise must not fail a night's run at its very end."""
    from safetensors.torch import load_file

    from trainctl.worker import export
    from trainctl.worker.images import Recipe
    from trainctl.worker.report import Reporter
    state = {"w": torch.randn(3, 3), "b": torch.zeros(3)}

    def old_timm(model, config_path, model_config=None, model_args=None):   # no data_config
        raise AssertionError("not reached: the call itself is a TypeError")

    monkeypatch.setattr(export, "save_config_for_hf", old_timm)
    trainer = SimpleNamespace(
        run_dir=tmp_path, reporter=Reporter(tmp_path, 1, 0), optimizer=SimpleNamespace(state={}),
        cfg=SimpleNamespace(model=SimpleNamespace(name="m")), train_set=SimpleNamespace(classes=("a", "b")),
        recipe=Recipe(size=32), progress=SimpleNamespace(step=3), model=SimpleNamespace(state_dict=lambda: state),
        history=[], faults=SimpleNamespace(hit=lambda point, step=None: None))
    export.write(trainer)
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model*"))   # no half folder
    assert (tmp_path / "labels.json").exists()
