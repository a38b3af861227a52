"""A ladder that learns: where runs on this machine stayed stable, and the memory failures that pushed them down.

A run that starts on a rung that ran out of memory again and again on this machine only spends its first
minutes (and the restarts of its rung budget) learning what the last runs already learned. So each machine
keeps, per (model, image size, device, batch size, precision), the wall-clock times of the recent memory
failures and of the last time a run was stable there (finished an epoch, or the run). `choose_start`, a pure
function, starts a new run one rung lower for every rung that ran out of memory MEMORY_FAILURES times within
WINDOW_SECONDS and has not been stable since, and says why in one line. The last rung is always allowed.

The store is `rungs.json` beside the registry of runs (`runs.registry_path()`). It is advice, never a reason
to stop or fail: a corrupt, unreadable or hand-mangled file reads as empty (bad entries are dropped one by one),
and the next note replaces it atomically; a note that cannot be written (a read-only home, a full disk)
returns False for the caller to say. Notes are a read-modify-write under `rungs.json.lock`, so two
supervisors on one machine noting at once lose nothing. Times are wall clock (`time.time()`): they must mean
the same after a reboot, and a day of error in a seven-day window is harmless.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import filelock

from trainctl.contract import fsio
from trainctl.contract.config import Config
from trainctl.contract.runfolder import is_finite_number

from .runs import registry_path

STORE_NAME = "rungs.json"
STORE_VERSION = 1
WINDOW_SECONDS = 7 * 24 * 3600.0   # failures older than this no longer count: drivers, OS and free memory change
MEMORY_FAILURES = 3                # this many recent failures on a rung and a new run starts below it
KEEP_FAILURES = 10                 # per rung, newest last: more than any window decision needs
MAX_KEYS = 200                     # the least recently touched rungs go beyond this
LOCK_TIMEOUT_SECONDS = 10.0        # another supervisor holds the lock for one small write; beyond this, skip
MAX_STORE_BYTES = 4 * 2**20        # a file this big is not ours: read as empty (the next note replaces it)
OVERRIDE_HINT = "`--rung 1` or `[supervisor] learn_rungs = false` overrides"


@dataclass(frozen=True)
class RungKey:
    """One rung of one model on one machine: what memory a run there needs depends on all of these."""
    host: str
    model: str
    img_size: int | None      # None = the model's own input size
    device: str               # as the config says it ("auto" stays "auto": one machine resolves it one way)
    batch_size: int
    precision: str

    def text(self) -> str:
        """The key as stored: 'myhost|eva02_base_patch14_224.mim_in22k|224|mps|2|fp32' ('-' for no img_size)."""
        size = "-" if self.img_size is None else str(self.img_size)
        return "|".join((self.host, self.model, size, self.device, str(self.batch_size), self.precision))


def key_of(cfg: Config, rung_index: int, host: str | None = None) -> RungKey:
    """The key of rung `rung_index` (from 0) of `cfg`, on `host` (this machine by default)."""
    p = cfg.profiles[rung_index]
    return RungKey(host if host is not None else socket.gethostname(), cfg.model.name, cfg.model.img_size,
                   p.device, p.batch_size, p.precision)


@dataclass(frozen=True)
class Entry:
    """What this machine remembers of one rung."""
    memory_failures: tuple[float, ...] = ()   # wall-clock times, newest last, at most KEEP_FAILURES
    stable: float | None = None               # the last time a run completed an epoch or finished here
    last_failure_kind: str = ""               # the failure's kind ("oom", "memory_limit")
    last_run: str = ""                        # the name of the run that noted last

    @property
    def touched(self) -> float:
        """The newest time noted here (the store keeps the most recently touched rungs)."""
        return max((*self.memory_failures, self.stable or 0.0), default=0.0)

    def to_json(self) -> dict[str, Any]:
        """The entry as stored."""
        return {"memory_failures": list(self.memory_failures), "stable": self.stable,
                "last_failure_kind": self.last_failure_kind, "last_run": self.last_run}

    @classmethod
    def from_json(cls, obj: Any) -> Entry | None:
        """An entry from stored JSON, tolerant of hand edits: bad fields read as absent; None if not a table."""
        if not isinstance(obj, dict):
            return None
        failures = obj.get("memory_failures")
        times = sorted(t for t in (failures if isinstance(failures, list) else []) if is_finite_number(t))
        stable = obj.get("stable")
        return cls(memory_failures=tuple(float(t) for t in times[-KEEP_FAILURES:]),
                   stable=float(stable) if is_finite_number(stable) else None,
                   last_failure_kind=text_or_empty(obj.get("last_failure_kind")),
                   last_run=text_or_empty(obj.get("last_run")))


def text_or_empty(value: Any) -> str:
    return value if isinstance(value, str) else ""


def counted_failures(entry: Entry, now: float, window: float = WINDOW_SECONDS) -> tuple[float, ...]:
    """The failures that count against a rung: after its last stable time and at most `window` before `now`."""
    return tuple(t for t in entry.memory_failures
                 if t >= now - window and (entry.stable is None or t > entry.stable))


def choose_start(entries: dict[str, Entry], keys: list[RungKey], now: float, window: float = WINDOW_SECONDS,
                 needed: int = MEMORY_FAILURES,
                 describe: Callable[[int], str] | None = None) -> tuple[int, str | None]:
    """The rung (from 0) a new run starts on: the first with fewer than `needed` counted memory failures, the
    last rung at the latest; and one line saying why (None when it is rung 0). `describe(i)` names rung i."""
    name = describe or (lambda i: f"{keys[i].device} batch {keys[i].batch_size}")
    skipped: list[str] = []
    for i, key in enumerate(keys):
        failures = counted_failures(entries.get(key.text(), Entry()), now, window)
        if i == len(keys) - 1 or len(failures) < needed:
            if not skipped:
                return i, None
            return i, f"starting on rung {i + 1} ({name(i)}): {', '.join(skipped)}, not stable since; {OVERRIDE_HINT}"
        times = "once" if len(failures) == 1 else f"{len(failures)} times"
        said = f"ran out of memory {times} on this machine" if not skipped else times   # the first says it all
        skipped.append(f"rung {i + 1} ({name(i)}) {said} since {clock_text(min(failures))}")
    return 0, None


def clock_text(when: float) -> str:
    """'2026-11-30 22:14', this machine's local time."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when))


def store_path() -> Path:
    """rungs.json beside the registry of runs ($XDG_STATE_HOME/trainctl or ~/.local/state/trainctl)."""
    return registry_path().parent / STORE_NAME


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def load(path: Path | None = None) -> dict[str, Entry]:
    """The store by key text; empty when the file is missing, unreadable or not ours. No lock needed: every
    write replaces the whole file atomically."""
    path = path or store_path()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STORE_BYTES + 1)
        doc = json.loads(raw) if len(raw) <= MAX_STORE_BYTES else None
    except (OSError, ValueError, RecursionError):   # ValueError: bad JSON or bad UTF-8; RecursionError: [[[[...
        return {}
    rungs = doc.get("rungs") if isinstance(doc, dict) else None
    if not isinstance(rungs, dict):
        return {}
    entries = {key: Entry.from_json(value) for key, value in rungs.items()}
    return {key: entry for key, entry in entries.items() if entry is not None}


def update(key: RungKey, change: Callable[[Entry], Entry], path: Path | None = None) -> bool:
    """Apply `change` to one rung's entry under the store's lock, then replace the file atomically.
    False, never an exception, when the store cannot be written: it is advice, training goes on."""
    path = path or store_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(lock_path(path), timeout=LOCK_TIMEOUT_SECONDS):
            entries = load(path)
            entries[key.text()] = change(entries.get(key.text(), Entry()))
            entries = bounded(entries, keep=key.text())
            # Not fsynced (as the registry of runs): a note lost to a power cut is harmless, an empty file reads as {}.
            fsio.atomic_write_json(path, {"version": STORE_VERSION,
                                          "rungs": {k: e.to_json() for k, e in entries.items()}}, durable=False)
    except (filelock.Timeout, OSError):
        return False
    return True


def bounded(entries: dict[str, Entry], keep: str, limit: int = MAX_KEYS) -> dict[str, Entry]:
    """At most `limit` entries: `keep` and the most recently touched others."""
    if len(entries) <= limit:
        return entries
    others = sorted((k for k in entries if k != keep), key=lambda k: entries[k].touched, reverse=True)
    kept = {keep, *others[:limit - 1]}
    return {k: e for k, e in entries.items() if k in kept}


def note_memory_failure(key: RungKey, kind: str, run: str, when: float | None = None,
                        path: Path | None = None) -> bool:
    """Remember that run `run` failed for memory (`kind`) on rung `key`; False if it could not be written."""
    when = time.time() if when is None else when

    def change(e: Entry) -> Entry:
        failures = tuple(sorted((*e.memory_failures, when)))[-KEEP_FAILURES:]
        return Entry(failures, e.stable, kind, run)
    return update(key, change, path)


def note_stable(key: RungKey, run: str, when: float | None = None, path: Path | None = None) -> bool:
    """Remember that run `run` was stable on rung `key` (an epoch completed, or the run finished)."""
    when = time.time() if when is None else when

    def change(e: Entry) -> Entry:
        return Entry(e.memory_failures, max(when, e.stable or when), e.last_failure_kind, run)
    return update(key, change, path)


def start_rung(cfg: Config, now: float | None = None, path: Path | None = None,
               host: str | None = None) -> tuple[int, str | None]:
    """The rung (from 0) a new run of `cfg` starts on on this machine, and why (None for rung 0)."""
    keys = [key_of(cfg, i, host) for i in range(len(cfg.profiles))]
    return choose_start(load(path), keys, time.time() if now is None else now, describe=cfg.rung_text)


class Notes:
    """What one supervised run teaches this machine's rung memory: its memory failures, and the rungs where it
    completed an epoch or finished. Nothing when `[supervisor] learn_rungs` is off; a note that cannot be
    written costs the run nothing."""

    def __init__(self, cfg: Config):
        self.cfg, self.on = cfg, cfg.supervisor.learn_rungs
        self.epoch_seen: int | None = None   # the attempt's epoch when last looked at

    def spawned(self) -> None:
        self.epoch_seen = None

    def beat(self, rung_index: int, epoch) -> None:
        """A look at the attempt's heartbeat: a higher epoch than before means one completed on this rung."""
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            return
        if self.epoch_seen is not None and epoch > self.epoch_seen:
            self.stable(rung_index)
        self.epoch_seen = epoch

    def stable(self, rung_index: int) -> None:
        if self.on:
            note_stable(key_of(self.cfg, rung_index), self.cfg.run.name)

    def failed(self, rung_index: int, kind: str) -> None:
        if self.on:
            note_memory_failure(key_of(self.cfg, rung_index), kind, self.cfg.run.name)
