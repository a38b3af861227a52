"""What the worker tells the outside world: heartbeat, metrics log, bad-image list, console lines."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trainctl.contract import fsio
from trainctl.contract.protocol import HEARTBEAT_FIELDS, Phase
from trainctl.contract.runfolder import BAD_IMAGES_FILE, HEARTBEAT_FILE, METRICS_FILE, read_json

HEARTBEAT_MIN_INTERVAL = 0.5   # seconds between heartbeat writes, unless the phase changes


class Reporter:
    """Owns heartbeat.json, metrics.jsonl and bad_images.json for one worker process."""

    def __init__(self, run_dir: Path, attempt: int, rung_index: int):
        self.run_dir = Path(run_dir)
        self.fields: dict = {"pid": os.getpid(), "attempt": attempt, "rung_index": rung_index,
                             "beat": 0, "phase": Phase.BOOTING.value}
        self._last_write = 0.0
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
            fsio.atomic_write_json(self.run_dir / HEARTBEAT_FILE, self.fields, durable=False)
            self._last_write = now

    def metric(self, record: dict) -> None:
        """Append one line to metrics.jsonl (re-done steps after a crash appear again, marked by attempt)."""
        record = {"time": round(time.time(), 3), "attempt": self.fields["attempt"], **record}
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def bad_images(self, found: list[tuple[str, str]]) -> None:
        """Log each unreadable file once and keep the full list, with reasons, in the run directory."""
        new = [(path, why) for path, why in found if path not in self.bad]
        if not new:
            return
        for path, why in new:
            self.bad[path] = why
            say(f"unreadable image (replaced by a blank, excluded from loss and accuracy): {path}: {why}")
        fsio.atomic_write_json(self.run_dir / BAD_IMAGES_FILE, {"count": len(self.bad), "files": self.bad})


def say(message: str) -> None:
    """One line on the worker's console (which the supervisor sends to logs/worker.log)."""
    print(f"[trainctl] {message}", flush=True)
