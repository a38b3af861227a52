"""The ladder that learns: the pure start decision (tables, fake times) and the store through real files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from trainctl.contract import config as configlib
from trainctl.supervisor.demo_data import small_config
from trainctl.supervisor.rung_memory import (KEEP_FAILURES, MAX_KEYS, Entry, RungKey, choose_start, key_of,
                                             load, note_memory_failure, note_stable, start_rung, store_path)
from trainctl.supervisor.waiting import wait_for

DAY = 24 * 3600.0
NOW = 1_800_000_000.0     # a fixed wall clock: every time below is relative to it
LADDER = [RungKey("box", "vit_b", 224, "mps", 2, "fp32"), RungKey("box", "vit_b", 224, "mps", 1, "fp32"),
          RungKey("box", "vit_b", 224, "cpu", 1, "fp32")]


def stamp(when: float) -> str:
    return datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M")


def failures(*hours_ago: float, stable_hours_ago: float | None = None) -> Entry:
    return Entry(tuple(sorted(NOW - h * 3600 for h in hours_ago)),
                 None if stable_hours_ago is None else NOW - stable_hours_ago * 3600)


@pytest.mark.parametrize("rungs, expected", [
    ({}, 0),                                                                   # nothing known
    ({0: failures(1, 2)}, 0),                                                  # 2 failures: not enough
    ({0: failures(1, 2, 3)}, 1),                                               # 3 recent failures: one lower
    ({0: failures(1, 2, 3, 4, 5)}, 1),
    ({0: failures(1, 2, 3, stable_hours_ago=0.5)}, 0),                         # stable since: forgiven
    ({0: failures(1, 2, 3, stable_hours_ago=2.5)}, 0),                         # only 2 after the stable mark
    ({0: failures(1, 2, 3, 4, stable_hours_ago=3.5)}, 1),                      # 3 after it
    ({0: failures(1, 2, 8 * 24)}, 0),                                          # one is older than the window
    ({0: failures(1, 2, 3), 1: failures(1, 2, 3)}, 2),                         # two bad rungs: skip two
    ({0: failures(1, 2, 3), 1: failures(1, 2)}, 1),
    ({1: failures(1, 2, 3)}, 0),                                               # a bad lower rung: no matter
    ({0: failures(1, 2, 3), 1: failures(1, 2, 3), 2: failures(1, 2, 3)}, 2),   # the last rung always allowed
])
def test_choose_start(rungs, expected):
    entries = {LADDER[i].text(): entry for i, entry in rungs.items()}
    index, reason = choose_start(entries, LADDER, NOW)
    assert index == expected
    assert (reason is None) == (expected == 0)


@pytest.mark.parametrize("window, needed, expected", [
    (DAY, 3, 0),         # a one-day window: the failure 30 hours ago no longer counts
    (2 * DAY, 3, 1),
    (DAY, 2, 1),
    (2 * DAY, 4, 0),
])
def test_choose_start_window_and_count(window, needed, expected):
    entries = {LADDER[0].text(): failures(1, 2, 30)}
    assert choose_start(entries, LADDER, NOW, window=window, needed=needed)[0] == expected


def test_only_rung_is_always_allowed():
    assert choose_start({LADDER[0].text(): failures(1, 2, 3, 4)}, LADDER[:1], NOW) == (0, None)
    assert choose_start({}, [], NOW) == (0, None)


def test_reason_names_rungs_from_1_with_counts_times_and_override():
    entries = {LADDER[0].text(): failures(1, 2, 3), LADDER[1].text(): failures(5, 6, 7, 9)}
    index, reason = choose_start(entries, LADDER, NOW, describe=lambda i: f"R{i}")
    assert index == 2
    assert reason == (f"starting on rung 3 (R2): rung 1 (R0) ran out of memory 3 times on this machine since "
                      f"{stamp(NOW - 3 * 3600)}, rung 2 (R1) 4 times since {stamp(NOW - 9 * 3600)}, not stable since; "
                      f"`--rung 1` or `[supervisor] learn_rungs = false` overrides")
    assert "\n" not in reason


def test_reason_without_describe_uses_the_keys():
    _, reason = choose_start({LADDER[0].text(): failures(1, 2, 3)}, LADDER, NOW)
    assert reason.startswith("starting on rung 2 (mps batch 1): rung 1 (mps batch 2) ran out of memory 3 times")


def test_key_text():
    assert LADDER[0].text() == "box|vit_b|224|mps|2|fp32"
    assert RungKey("box", "vit_b", None, "auto", 4, "bf16").text() == "box|vit_b|-|auto|4|bf16"


def real_config(tmp_path: Path, **model) -> configlib.Config:
    """A validated config from a TOML file (its data folder need not exist to load)."""
    path = tmp_path / "run.toml"
    path.write_text(small_config("learner", tmp_path / "data", model={"name": "vit_b", **model},
                                 profiles=[{"device": "mps", "batch_size": 2},
                                           {"device": "cpu", "batch_size": 8, "precision": "bf16"}]))
    return configlib.load(path)


def test_key_of_a_real_config(tmp_path):
    cfg = real_config(tmp_path, img_size=224)
    assert key_of(cfg, 0, host="box") == RungKey("box", "vit_b", 224, "mps", 2, "fp32")
    assert key_of(cfg, 1, host="box").text() == "box|vit_b|224|cpu|8|bf16"
    assert key_of(cfg, 0).host == socket.gethostname()
    cfg = real_config(tmp_path, img_size=None)     # the model's own size
    assert key_of(cfg, 0, host="box").text() == "box|vit_b|-|mps|2|fp32"


def test_start_rung_from_a_real_config_and_store(tmp_path):
    cfg = real_config(tmp_path, img_size=224)
    store = tmp_path / "state" / "rungs.json"
    assert start_rung(cfg, now=NOW, path=store) == (0, None)    # no store yet
    for hours in (1, 2, 3):
        assert note_memory_failure(key_of(cfg, 0), "oom", "learner", when=NOW - hours * 3600, path=store)
    index, reason = start_rung(cfg, now=NOW, path=store)
    assert index == 1
    assert reason.startswith(f"starting on rung 2 ({cfg.rung_text(1)}): rung 1 ({cfg.rung_text(0)}) ran out")
    assert start_rung(cfg, now=NOW, path=store, host="another-machine") == (0, None)
    assert note_stable(key_of(cfg, 0), "learner", when=NOW - 600, path=store)
    assert start_rung(cfg, now=NOW, path=store) == (0, None)


def test_store_path_beside_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert store_path() == tmp_path / "trainctl" / "rungs.json"


def test_round_trip_through_a_file(tmp_path):
    store = tmp_path / "deep" / "er" / "rungs.json"     # the folder is created on the first note
    key = LADDER[0]
    assert load(store) == {}
    assert note_memory_failure(key, "oom", "run-a", when=NOW - 20, path=store)
    assert note_memory_failure(key, "memory_limit", "run-b", when=NOW - 10, path=store)
    assert note_stable(key, "run-c", when=NOW - 5, path=store)
    assert note_stable(LADDER[2], "run-c", when=NOW, path=store)
    assert load(store) == {key.text(): Entry((NOW - 20, NOW - 10), NOW - 5, "memory_limit", "run-c"),
                           LADDER[2].text(): Entry((), NOW, "", "run-c")}
    assert json.loads(store.read_text())["rungs"][key.text()]["stable"] == NOW - 5   # readable JSON by key text


def test_failures_kept_newest_last_and_bounded(tmp_path):
    store = tmp_path / "rungs.json"
    for i in [3, 1, 2] + list(range(4, KEEP_FAILURES + 4)):     # one noted out of order
        assert note_memory_failure(LADDER[0], "oom", "r", when=float(i), path=store)
    assert load(store)[LADDER[0].text()].memory_failures == tuple(float(i) for i in range(4, KEEP_FAILURES + 4))


def test_store_keeps_the_most_recently_touched_keys(tmp_path):
    store = tmp_path / "rungs.json"
    keys = [RungKey("box", f"model{i}", None, "cpu", 1, "fp32") for i in range(MAX_KEYS + 5)]
    for i, key in enumerate(keys):
        assert note_stable(key, "r", when=NOW + i, path=store)
    kept = load(store)
    assert len(kept) == MAX_KEYS
    assert set(kept) == {key.text() for key in keys[5:]}


@pytest.mark.parametrize("content", [
    b"", b"{not json", b"\xff\xfe\x00garbage", b"[]", b"null", b'{"rungs": []}', b'{"version": 1}',
    b"[" * 100_000 + b"]" * 100_000,
])
def test_a_corrupt_file_reads_as_empty_and_the_next_note_replaces_it(tmp_path, content):
    store = tmp_path / "rungs.json"
    store.write_bytes(content)
    assert load(store) == {}
    assert note_memory_failure(LADDER[0], "oom", "r", when=NOW, path=store)
    assert load(store) == {LADDER[0].text(): Entry((NOW,), None, "oom", "r")}


def test_hand_edits_keep_what_is_good(tmp_path):
    store = tmp_path / "rungs.json"
    store.write_text('{"rungs": {"good": {"memory_failures": [3.0, 1, "x", null, true, NaN, Infinity, 1' + "0" * 400
                     + '], "stable": "yesterday", "last_failure_kind": 5, "last_run": "r"}, '
                     '"bare": {}, "not a table": [1, 2], "number": 7}}')
    assert load(store) == {"good": Entry((1.0, 3.0), None, "", "r"), "bare": Entry()}


def test_older_file_without_optional_fields(tmp_path):
    store = tmp_path / "rungs.json"
    store.write_text(json.dumps({"rungs": {LADDER[0].text(): {"memory_failures": [NOW - 3, NOW - 2, NOW - 1]}}}))
    assert choose_start(load(store), LADDER, NOW)[0] == 1


CHILD = """
import sys, time
from pathlib import Path
from trainctl.supervisor.rung_memory import RungKey, note_memory_failure
store, go, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
Path(str(go) + "-" + name).touch()
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:   # both start writing together
    time.sleep(0.001)
for i in range(20):
    assert note_memory_failure(RungKey("box", f"{name}{i}", None, "cpu", 1, "fp32"), "oom", name, path=store)
"""


def test_two_processes_noting_at_once_lose_nothing(tmp_path):
    store, go = tmp_path / "rungs.json", tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(store), str(go), name]) for name in ("a", "b")]
    try:
        wait_for(lambda: all(Path(f"{go}-{name}").exists() for name in "ab"), 120, what="both writers ready")
    finally:
        go.touch()
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    assert set(load(store)) == {f"box|{name}{i}|-|cpu|1|fp32" for name in "ab" for i in range(20)}


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_folder_makes_notes_return_false(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    store = folder / "rungs.json"
    assert note_memory_failure(LADDER[0], "oom", "r", when=NOW, path=store)
    folder.chmod(0o555)
    try:
        assert note_memory_failure(LADDER[0], "oom", "r", when=NOW + 1, path=store) is False
        assert note_stable(LADDER[0], "r", when=NOW + 2, path=store) is False
        assert note_stable(LADDER[0], "r", path=folder / "missing" / "rungs.json") is False
        assert load(store) == {LADDER[0].text(): Entry((NOW,), None, "oom", "r")}   # unchanged, still readable
    finally:
        folder.chmod(0o755)
