"""Hostile checkpoints (issue 17, item 1): only what verifies is trusted, a bad one is set aside and never the
reason to delete a good one, verification is bounded, and a run whose checkpoints all fail is not silently
started over from step 0."""
from __future__ import annotations

import json
import os
import zlib

import pytest
import torch
from conftest import assert_same_weights, config_text, events, make_run, run_worker
from test_cli import trainctl

from trainctl.contract.lifecycle import State
from trainctl.contract.protocol import ExitCode
from trainctl.contract.runfolder import (checkpoint_path, committed_checkpoints, marker_path, newest_checkpoint,
                                         set_aside_checkpoints)
from trainctl.supervisor.runstate import read_state
from trainctl.supervisor.status import gather
from trainctl.worker import checkpoint

FORGED = 999999999


def state(step: int) -> dict:
    return {"format": checkpoint.FORMAT, "model": {"w": torch.full((64, 64), float(step))}, "step": step}


def save(folder, step, keep=3, **kw):
    return checkpoint.save(folder, step, state(step), keep, {"epoch": 0}, **kw)


def forge(folder, step=FORGED, data=b"not a checkpoint" * 64, **fields) -> None:
    """A data file and a well-formed marker for it, with a wrong CRC (forged, or left by corruption)."""
    path = checkpoint_path(folder, step)
    path.write_bytes(data)
    marker = {"format": 1, "step": step, "file": path.name, "size": len(data),
              "crc32": f"{zlib.crc32(data) ^ 1:08x}", "created": 1.7e9, **fields}
    marker_path(path).write_text(json.dumps(marker))


def flip_byte(path) -> None:
    """One byte changed in place (what bit rot or a stray write does)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_forged_newer_marker_never_gets_good_checkpoints_pruned(tmp_path):
    verified = checkpoint.Verified()   # what a worker's writer keeps: the training thread reports what it set aside
    for step in (3, 6, 9):
        save(tmp_path, step, verified=verified)
    forge(tmp_path)
    for step in (12, 15):
        save(tmp_path, step, verified=verified)
    assert [c.step for c in committed_checkpoints(tmp_path)] == [9, 12, 15]   # keep_last good ones, not 0 or 1
    (reported,) = verified.take_set_aside()
    assert reported[0] == checkpoint_path(tmp_path, FORGED).name and "moved to corrupt/" in reported[1]
    assert [b["step"] for b in set_aside_checkpoints(tmp_path)] == [FORGED]
    assert "checksum mismatch" in set_aside_checkpoints(tmp_path)[0]["reason"]
    assert (tmp_path / "corrupt" / checkpoint_path(tmp_path, FORGED).name).exists()   # kept, both files
    assert (tmp_path / "corrupt" / marker_path(checkpoint_path(tmp_path, FORGED)).name).exists()
    assert checkpoint.load_latest(tmp_path)[1].step == 15


def test_a_checkpoint_changed_after_it_was_verified_is_verified_again_before_it_counts(tmp_path):
    verified = checkpoint.Verified()
    save(tmp_path, 3, verified=verified)
    changed = save(tmp_path, 6, verified=verified).path
    flip_byte(changed)    # a stray write after the commit: its mtime moves on (made explicit: the clock is coarse)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    save(tmp_path, 9, verified=verified)
    assert [c.step for c in committed_checkpoints(tmp_path)] == [3, 9]
    assert [b["was"] for b in set_aside_checkpoints(tmp_path)] == [checkpoint_path(tmp_path, 6).name]


def test_a_forged_marker_found_at_boot_is_set_aside_and_the_real_newest_loads(tmp_path):
    save(tmp_path, 3)
    save(tmp_path, 6)
    forge(tmp_path)
    loaded, found, skipped = checkpoint.load_latest(tmp_path)
    assert found.step == 6 and loaded["step"] == 6
    assert [name for name, _ in skipped] == [checkpoint_path(tmp_path, FORGED).name]
    assert "moved to corrupt/" in skipped[0][1]
    assert [c.step for c in committed_checkpoints(tmp_path)] == [3, 6]


@pytest.mark.parametrize("field,value", [("size", "263785"), ("created", "yesterday"), ("crc32", 12345),
                                         ("step", 7.0), ("size", -1), ("created", float("nan"))])
def test_a_marker_with_bad_fields_is_no_commit_marker_and_breaks_nothing(tmp_path, dataset, field, value):
    run_dir = make_run(tmp_path, "fields", config_text("fields", dataset))
    folder = run_dir / "checkpoints"
    save(folder, 3)
    newest = save(folder, 7)
    marker = {**newest.marker, field: value}
    marker_path(newest.path).write_text(json.dumps(marker))
    assert [c.step for c in committed_checkpoints(folder)] == [3]     # the supervisor's view: not committed
    save(folder, 9)                                                  # a later write does not crash
    st = gather(run_dir)                                             # nor status
    assert st.last_checkpoint.step == 9
    json.dumps(st.to_json(), allow_nan=False)
    # The next prune (or boot) sets it aside, both files, with the reason.
    assert [b["step"] for b in st.set_aside_checkpoints] == [7] and field in st.set_aside_checkpoints[0]["reason"]
    if not isinstance(value, str):
        return   # the commands themselves: for the two the issue found (each command is a process)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "200"}
    for args in (["status", "fields"], ["status", "fields", "--json"], ["list"], ["list", "--json"]):
        result = trainctl(*args, env=env, cwd=tmp_path)
        assert result.returncode == ExitCode.OK and "Traceback" not in result.stderr, (args, result.stderr)
    assert "set aside" in trainctl("status", "fields", env=env, cwd=tmp_path).stdout


def test_a_marker_with_bad_fields_at_boot_is_set_aside(tmp_path):
    save(tmp_path, 3)
    newest = save(tmp_path, 6)
    marker_path(newest.path).write_text(json.dumps({**newest.marker, "size": "lots"}))
    loaded, found, skipped = checkpoint.load_latest(tmp_path)
    assert found.step == 3 and skipped[0][0] == newest.path.name and "size 'lots'" in skipped[0][1]


def read_bytes_so_far() -> int:
    """Bytes this process has read through read() calls (Linux /proc/self/io: sparse holes count too)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes read with /proc/self/io (Linux)")
def test_a_huge_sparse_file_with_a_matching_marker_is_refused_unread(tmp_path):
    """2 TB of holes with a marker of the right size: before, every boot read it all (minutes, then 'hang')."""
    save(tmp_path, 3)
    huge = 2 * 10**12
    path = checkpoint_path(tmp_path, 10)
    try:
        with open(path, "wb") as f:
            f.truncate(huge)
    except OSError as e:
        pytest.skip(f"this filesystem has no 2 TB sparse files: {e}")
    marker_path(path).write_text(json.dumps({"format": 1, "step": 10, "file": path.name, "size": huge,
                                             "crc32": "00000000", "created": 1.7e9}))
    assert [c.step for c in committed_checkpoints(tmp_path)] == [3, 10]   # the cheap checks pass it: sizes match
    before = read_bytes_so_far()
    bound = checkpoint.Verified(max_bytes=checkpoint.size_bound(state(0)))
    loaded, found, skipped = checkpoint.load_latest(tmp_path, bound)
    assert read_bytes_so_far() - before < 64 << 20
    assert found.step == 3 and skipped[0][0] == path.name and "not read" in skipped[0][1], skipped
    assert [b["step"] for b in set_aside_checkpoints(tmp_path)] == [10]


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes read with /proc/self/io (Linux)")
def test_a_huge_sparse_file_appearing_mid_run_is_refused_unread_by_prune(tmp_path):
    save(tmp_path, 3)
    path = checkpoint_path(tmp_path, 10)
    try:
        with open(path, "wb") as f:
            f.truncate(2 * 10**12)
    except OSError as e:
        pytest.skip(f"this filesystem has no 2 TB sparse files: {e}")
    marker_path(path).write_text(json.dumps({"step": 10, "file": path.name, "size": 2 * 10**12, "crc32": "00000000"}))
    before = read_bytes_so_far()
    save(tmp_path, 6)   # its disk-space check and its prune must not trust or read the 2 TB file
    assert read_bytes_so_far() - before < 64 << 20
    assert [c.step for c in committed_checkpoints(tmp_path)] == [3, 6]


def test_a_disk_full_message_says_sizes_as_people_do():
    assert checkpoint.size_text(20 * 10**6) == "20 MB"
    assert checkpoint.size_text(1.5e9) == "1.5 GB"
    assert checkpoint.size_text(2e12) == "2 TB"
    assert checkpoint.size_text(640_000) == "640 kB"
    assert checkpoint.size_text(12) == "12 bytes"


def test_only_a_first_write_cut_short_starts_from_zero(tmp_path):
    """A data file without a marker and nothing ever committed: the crash came during the very first write."""
    (tmp_path / "step-000000003.pt").write_bytes(b"renamed, never marked")
    assert checkpoint.load_latest(tmp_path) == (None, None, [("step-000000003.pt",
                                                               "no commit marker (interrupted before commit)")])


def test_when_checkpoints_existed_and_none_verifies_the_worker_will_not_start_over(tmp_path):
    from trainctl.contract.protocol import CannotContinue
    for step in (3, 6):
        flip_byte(save(tmp_path, step).path)
    for attempt in range(2):   # the second boot finds them in corrupt/: still no silent start over
        with pytest.raises(CannotContinue) as e:
            checkpoint.load_latest(tmp_path)
        assert e.value.kind == "no_checkpoint"
        message = str(e.value)
        assert "corrupt/step-000000003.pt" in message and "corrupt/step-000000006.pt" in message, message
        assert "checksum mismatch" in message and "--from-scratch" in message


def test_every_kept_checkpoint_corrupt_then_sigkill_fails_the_run_and_from_scratch_starts_over(tmp_path, dataset,
                                                                                                 reference_run):
    """The issue's realistic variant: keep_last = 3, one flipped byte in each kept .pt, SIGKILL. Before: all three
    skipped, training silently restarted from step 0 and `stop` reported the corrupt one. Now: the run fails with
    no_checkpoint naming the files; `resume --from-scratch` sets them aside and trains from step 0."""
    text = config_text("rotten", dataset, checkpoint={"keep_last": 3}, profiles=[{"device": "cpu", "batch_size": 8}])
    run_dir = make_run(tmp_path, "rotten", text)
    killed = run_worker(run_dir, faults="train_step:sigkill@11")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    kept = committed_checkpoints(run_dir / "checkpoints")
    assert len(kept) == 3
    for c in kept:
        flip_byte(c.path)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "200", "TRAINCTL_FAULTS": ""}
    resumed = trainctl("resume", str(run_dir), "--foreground", env=env, cwd=tmp_path, timeout=300)
    assert resumed.returncode == ExitCode.FAILED, resumed.stdout + resumed.stderr
    saved = read_state(run_dir)
    assert saved.state == State.FAILED and "no checkpoint of run rotten verifies" in saved.reason
    for c in kept:
        assert f"corrupt/{c.path.name}" in saved.reason and (run_dir / "checkpoints" / "corrupt" / c.path.name).exists()
    assert [e["data"]["failure"] for e in events(run_dir, "exit")] == ["no_checkpoint"]
    st = json.loads(trainctl("status", "rotten", "--json", env=env, cwd=tmp_path).stdout)
    assert st["last_checkpoint"] is None and len(st["set_aside_checkpoints"]) == 3
    # A new `start` of the same name must not take it for a run that never trained and clear its history.
    restart = trainctl("start", "--config", str(tmp_path / "rotten.toml"), env=env, cwd=tmp_path)
    assert restart.returncode == ExitCode.REFUSED and "--from-scratch" in restart.stderr, restart.stdout + restart.stderr
    assert read_state(run_dir).state == State.FAILED and events(run_dir, "exit")
    again = trainctl("resume", str(run_dir), "--from-scratch", "--foreground", env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == ExitCode.OK, again.stdout + again.stderr
    assert "moved 3 checkpoints of rotten (9 files)" in again.stdout and "starts over from step 0" in again.stdout
    assert read_state(run_dir).state == State.SUCCEEDED
    assert events(run_dir, "spawn")[-1]["step"] is None                      # from step 0
    (aside,) = (run_dir / "checkpoints").glob("set-aside-*")
    assert sorted(p.name for p in (aside / "corrupt").glob("*.pt")) == sorted(c.path.name for c in kept)   # nothing deleted
    assert_same_weights(run_dir, reference_run)


def test_a_forged_marker_then_sigkill_resumes_from_the_real_newest(tmp_path, dataset, reference_run):
    """A marker at step 999999999 with a wrong CRC: before, every new checkpoint was pruned at once, the next boot
    restarted from step 0 and status reported step 999999999."""
    text = config_text("forged", dataset, checkpoint={"keep_last": 2}, profiles=[{"device": "cpu", "batch_size": 8}])
    run_dir = make_run(tmp_path, "forged", text)
    folder = run_dir / "checkpoints"
    killed = run_worker(run_dir, faults="train_step:sigkill@8")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    good = [c.step for c in committed_checkpoints(folder)]
    assert len(good) == 2, good
    forge(folder)
    assert newest_checkpoint(run_dir).step == FORGED   # the supervisor's cheap checks pass it: the worker verifies
    finished = run_worker(run_dir, attempt=2)
    assert finished.returncode == ExitCode.OK, finished.stdout + finished.stderr
    assert f"resumed from step-{max(good):09d}.pt" in finished.stdout + finished.stderr
    assert [b["step"] for b in set_aside_checkpoints(folder)] == [FORGED]
    assert gather(run_dir).last_checkpoint.step < FORGED
    assert_same_weights(run_dir, reference_run)
