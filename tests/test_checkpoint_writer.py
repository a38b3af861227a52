"""The checkpoint writer's cheap path (O_DIRECT from a page-aligned buffer, the checksum taken while copying into it)
writes the very bytes torch.save writes: new checkpoints commit, verify and restore bit-identically, older ones
(other markers, torch's own record checksums) still load, and a changed byte is still caught. Real files in tmp_path.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import mmap
import os
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trainctl.contract.config import Profile
from trainctl.contract.runfolder import checkpoint_path, committed_checkpoints, marker_path
from trainctl.worker import checkpoint, ckptfile
from trainctl.worker.snapshot import Progress, capture, restore


def trainer(seed: int) -> SimpleNamespace:
    """What `capture` and `restore` read: a model with buffers (BatchNorm), AdamW, a scheduler; ~29 MB of state,
    so a checkpoint spans several of the writer's buffers and ends in a tail of no whole number of blocks."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1200, 2000), torch.nn.BatchNorm1d(2000), torch.nn.ReLU(),
                                torch.nn.Linear(2000, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return SimpleNamespace(model=model, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 2),
                           scaler=None, progress=Progress(), device=torch.device("cpu"),
                           profile=Profile(batch_size=8, device="cpu"), rung_index=0, identity={"model": "mlp"},
                           history=[])


def train_step(t) -> None:
    x, y = torch.randn(8, 1200), torch.randint(0, 10, (8,))
    F.cross_entropy(t.model(x), y).backward()
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    t.progress.step += 1


def trained(steps: int = 2) -> SimpleNamespace:
    t = trainer(seed=0)
    for _ in range(steps):
        train_step(t)
    return t


def assert_same_training_state(a, b) -> None:
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        for field in sa[key]:
            assert torch.equal(sa[key][field], sb[key][field]), (key, field)
    assert a.scheduler.state_dict() == b.scheduler.state_dict() and a.progress == b.progress


def torch_save_bytes(state: dict, record_crc: bool) -> bytes:
    """What plain torch.save writes for `state` (with or without its per-record CRC-32)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(record_crc)
    try:
        out = io.BytesIO()
        torch.save(state, out)
    finally:
        torch.serialization.set_crc32_options(before)
    return out.getvalue()


def o_direct_works(folder) -> bool:
    """Whether the filesystem under `folder` takes O_DIRECT writes (tmpfs before Linux 6.6 refuses them)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    block = mmap.mmap(-1, 4096)
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        try:
            os.write(fd, block)
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        block.close()
        (folder / "probe").unlink(missing_ok=True)
    return True


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "page_cache"])
def test_a_new_checkpoint_commits_loads_weights_only_and_restores_bit_identically(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(ckptfile.ChecksumWriter, "DIRECT", direct)
    a = trained()
    state = capture(a)
    done = checkpoint.save(tmp_path, a.progress.step, state, keep_last=3, info={"epoch": 0})

    data = done.path.read_bytes()
    marker = json.loads(marker_path(done.path).read_text())
    assert marker["size"] == len(data) > 2 * ckptfile.ChecksumWriter.BUFFER_BYTES
    assert marker["crc32"] == f"{zlib.crc32(data):08x}"                 # the standard CRC-32, whoever computed it
    assert data == torch_save_bytes(state, record_crc=False)           # torch.save's own bytes, only moved differently
    torch.load(done.path, map_location="cpu", weights_only=True)       # the format any torch reads safely

    loaded, found, skipped = checkpoint.load_latest(tmp_path)
    assert found.step == a.progress.step and skipped == []
    b = trainer(seed=1)
    restore(b, loaded)
    assert_same_training_state(a, b)
    train_step(a)          # from the RNG state the checkpoint holds (the process-wide one, as restore left it)
    restore(b, loaded)     # ... which a's step has moved on: put it back where the checkpoint was taken
    train_step(b)
    assert_same_training_state(a, b)


def write_old_checkpoint(folder, step: int, state: dict, record_crc: bool, checksum: str):
    """A checkpoint as earlier trainctl versions committed it: plain torch.save bytes (torch's per-record CRC-32 on
    before it was switched off), and a marker with SHA-256 (the first markers) or CRC-32."""
    path = checkpoint_path(folder, step)
    path.write_bytes(data := torch_save_bytes(state, record_crc))
    digest = ({"sha256": hashlib.sha256(data).hexdigest()} if checksum == "sha256"
              else {"crc32": f"{zlib.crc32(data):08x}"})
    marker_path(path).write_text(json.dumps({"format": checkpoint.FORMAT, "step": step, "file": path.name,
                                             "size": len(data), "created": 1.7e9, "epoch": 0, **digest}))
    return path


@pytest.mark.parametrize("record_crc,checksum", [(True, "sha256"), (True, "crc32"), (False, "crc32")])
def test_checkpoints_of_earlier_versions_still_load_and_restore(tmp_path, record_crc, checksum):
    a = trained()
    write_old_checkpoint(tmp_path, a.progress.step, capture(a), record_crc, checksum)
    loaded, found, skipped = checkpoint.load_latest(tmp_path)
    assert found.step == a.progress.step and skipped == []
    b = trainer(seed=1)
    restore(b, loaded)
    assert_same_training_state(a, b)
    # ... and the writer goes on beside them: the next checkpoint commits, the old one is kept
    train_step(b)
    checkpoint.save(tmp_path, b.progress.step, capture(b), keep_last=3, info={"epoch": 0})
    assert [c.step for c in committed_checkpoints(tmp_path)] == [a.progress.step, b.progress.step]


@pytest.mark.parametrize("where", ["first byte", "middle", "last byte"])
def test_a_changed_byte_anywhere_is_caught_and_the_previous_checkpoint_loads(tmp_path, where):
    a = trained()
    checkpoint.save(tmp_path, 2, capture(a), keep_last=3, info={"epoch": 0})
    train_step(a)
    newest = checkpoint.save(tmp_path, 3, capture(a), keep_last=3, info={"epoch": 0})
    data = bytearray(newest.path.read_bytes())
    data[{"first byte": 0, "middle": len(data) // 2, "last byte": len(data) - 1}[where]] ^= 0x01
    newest.path.write_bytes(bytes(data))
    loaded, found, skipped = checkpoint.load_latest(tmp_path)
    assert found.step == 2 and loaded["progress"]["step"] == 2
    assert skipped[0][0] == newest.path.name and "checksum mismatch" in skipped[0][1]


def test_on_linux_the_bytes_bypass_the_page_cache(tmp_path, monkeypatch):
    if not o_direct_works(tmp_path):
        pytest.skip("no O_DIRECT here (not Linux, or a filesystem that refuses it): the page-cache path is the one")
    flags = []
    real_write = os.write

    def spy(fd, data):
        flags.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", spy)
    done = checkpoint.save(tmp_path, 1, capture(trained()), keep_last=1, info={})
    monkeypatch.undo()
    assert flags[:2] == [True, True] and flags[-1] is False   # whole buffers direct, the tail through the cache
    assert checkpoint.verify(done) is None


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_filesystem_that_takes_the_flag_but_refuses_direct_writes_gets_page_cache_writes(tmp_path, monkeypatch):
    real_write, refused = os.write, []

    def refusing(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", refusing)
    state = capture(trained())
    done = checkpoint.save(tmp_path, 1, state, keep_last=1, info={})
    monkeypatch.undo()
    assert refused == [ckptfile.ChecksumWriter.BUFFER_BYTES]   # tried once, then never again
    assert done.path.read_bytes() == torch_save_bytes(state, record_crc=False)
    assert checkpoint.verify(done) is None
