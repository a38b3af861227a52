"""What the worker tells the outside world: heartbeat, metrics log, bad-image list, console lines."""
from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

from trainctl.contract import fsio
from trainctl.contract.protocol import HEARTBEAT_FIELDS, Phase
from trainctl.contract.runfolder import BAD_IMAGES_FILE, HEARTBEAT_FILE, METRICS_FILE, read_json

HEARTBEAT_MIN_INTERVAL = 0.5   # seconds between heartbeat writes, unless the phase changes
RATE_WINDOW_SECONDS = 60.0     # images/s (and so the ETA) is measured over about this much of the latest steps


class Reporter:
    """Owns heartbeat.json, metrics.jsonl and bad_images.json for one worker process.

    None of them may end the training: a write that fails (a disk filled by another process: ENOSPC) is
    skipped and said once, and said again when writing works again. A checkpoint that cannot be written
    is what ends the run (`disk_full`), with the checkpoints it has intact.
    """

    def __init__(self, run_dir: Path, attempt: int, rung_index: int):
        self.run_dir = Path(run_dir)
        self.fields: dict = {"pid": os.getpid(), "attempt": attempt, "rung_index": rung_index,
                             "beat": 0, "phase": Phase.BOOTING.value}
        self._last_write = 0.0
        self._failing: set[str] = set()   # the files whose writes are failing (said once)
        existing = read_json(self.run_dir / BAD_IMAGES_FILE) or {}
        self.bad: dict[str, str] = existing.get("files", {})

    def beat(self, phase: Phase | None = None, force: bool = False, **fields) -> None:
        """Record progress; `beat` grows on every call, which is what proves the worker is alive."""
        unknown = fields.keys() - HEARTBEAT_FIELDS
        if unknown:   # the heartbeat is a typed contract (protocol.Heartbeat): no field it does not declare
            raise TypeError(f"not heartbeat fields: {sorted(unknown)}")
        changed = phase is not None and phase.value != self.fields["phase"]
        if phase is not None:
            self.fields["phase"] = phase.value
        self.fields["beat"] += 1
        self.fields.update(fields)
        now = time.monotonic()
        if changed or force or now - self._last_write >= HEARTBEAT_MIN_INTERVAL:
            self.fields["time"] = time.time()
            self.fields["bad_images"] = len(self.bad)
            if self._write(HEARTBEAT_FILE, lambda: fsio.atomic_write_json(self.run_dir / HEARTBEAT_FILE, self.fields,
                                                                          durable=False)):
                self._last_write = now

    def _write(self, name: str, write) -> bool:
        """Carry out one write of `name`; an OSError skips it (said once, and again when it heals)."""
        try:
            write()
        except OSError as e:
            if name not in self._failing:
                self._failing.add(name)
                say(f"cannot write {name} ({e.strerror or e}): skipped, training goes on; said again once it works")
            return False
        if name in self._failing:
            self._failing.discard(name)
            say(f"{name} is written again")
        return True

    def metric(self, record: dict) -> None:
        """Append one line to metrics.jsonl (re-done steps after a crash appear again, marked by attempt)."""
        record = {"time": round(time.time(), 3), "attempt": self.fields["attempt"], **record}

        def append():
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self._write(METRICS_FILE, append)

    def bad_images(self, found: list[tuple[str, str]]) -> None:
        """Log each unreadable file once and keep the full list, with reasons, in the run directory."""
        new = [(path, why) for path, why in found if path not in self.bad]
        if not new:
            return
        for path, why in new:
            self.bad[path] = why
            say(f"unreadable image (replaced by a blank, excluded from loss and accuracy): {path}: {why}")
        self._write(BAD_IMAGES_FILE, lambda: fsio.atomic_write_json(self.run_dir / BAD_IMAGES_FILE,
                                                                     {"count": len(self.bad), "files": self.bad}))


class RankReporter(Reporter):
    """The reporter of a rank other than 0 of a group: rank 0 writes the heartbeat, the metrics and the bad-image
    list for all of them (the numbers it reports are the group's), so this one writes nothing."""

    def beat(self, phase: Phase | None = None, force: bool = False, **fields) -> None:
        self.fields.update(fields)

    def metric(self, record: dict) -> None: ...

    def bad_images(self, found: list[tuple[str, str]]) -> None: ...


def say(message: str) -> None:
    """One line on the worker's console (which the supervisor sends to logs/worker.log)."""
    print(f"[trainctl] {message}", flush=True)


class StepRate:
    """Images per second over about the last `window` seconds of optimizer steps, counting the steps' own time."""
    # One step's rate swings with every loader hiccup (54 to 13 images/s, the ETA from 50 s to 3 min); a minute
    # of steps does not. Time that is no step's (checkpoint waits, validation) the caller leaves out; the
    # window is counted in step time, so a long pause does not empty it either.

    def __init__(self, window: float = RATE_WINDOW_SECONDS):
        self.window = window
        self._steps: deque[tuple[float, int]] = deque()   # (seconds, images), oldest first
        self._seconds, self._images = 0.0, 0
        self._warming = True   # the first step of a process carries start-up (loader processes, allocations)

    def add(self, seconds: float, images: int) -> None:
        """Count one optimizer step that took `seconds` of its own time for `images` images."""
        if self._warming and self._steps:   # a second step is in: the first one's start-up no longer counts
            self._steps.clear()
            self._seconds, self._images, self._warming = 0.0, 0, False
        seconds = max(seconds, 1e-9)   # a clock that did not move still counted a step
        self._steps.append((seconds, images))
        self._seconds += seconds
        self._images += images
        # Drop the oldest steps while the rest still cover the window.
        while len(self._steps) > 1 and self._seconds - self._steps[0][0] >= self.window:
            old_seconds, old_images = self._steps.popleft()
            self._seconds -= old_seconds
            self._images -= old_images

    @property
    def per_second(self) -> float | None:
        """The rate, or None before the first step."""
        return self._images / self._seconds if self._steps else None
