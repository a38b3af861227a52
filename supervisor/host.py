"""Everything the supervisor does outside the run folder, in one seam: processes, the sleep inhibitor,
memory and its pressure, the OOM-kill records, the clock, the service manager. `Host()` is the real
machine; tests pass fakes for all of it, so the loop runs without a single process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from . import memory, oomkill, pressure, process
from .awake import KeepAwake
from .classify import MemorySample, OomEvidence
from .notify import Notifier


class Worker(Protocol):
    """A worker process as the loop uses it (`process.WorkerProcess` is the real one)."""
    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float) -> int | None: ...
    def signal(self, sig: int) -> None: ...
    def kill_group(self) -> None: ...
    def stop(self, timeout: float) -> int: ...
    def go(self, rung_index: int, attempt: int, describe: str) -> bool: ...
    def release(self) -> None: ...


class Inhibitor(Protocol):
    """Keeps the machine awake while supervised (`awake.KeepAwake` is the real one)."""

    def start(self) -> None: ...
    def check(self) -> None: ...
    def stop(self) -> None: ...


@dataclass
class Host:
    spawn: Callable[[Path, int, int, str], Worker] = process.WorkerProcess.spawn   # run_dir, rung, attempt, text
    spawn_standby: Callable[[Path], Worker] = process.WorkerProcess.spawn_standby
    find_orphans: Callable[[Path], list] = process.orphans
    settle_orphans: Callable[[list, float], list[tuple[int, bool]]] = process.settle
    keep_awake: Callable[[str, int, Callable[[str], None]], Inhibitor] = KeepAwake   # run name, pid, echo
    sample_memory: Callable[[int, int], MemorySample] = memory.sample               # worker pid, device bytes
    total_memory: Callable[[], int] = memory.total_memory
    # the system's memory-pressure level, read at every look (built once with the run's thresholds)
    pressure_reader: Callable[[pressure.Thresholds], pressure.Reader] = pressure.Reader
    # the kernel's oom_kill counters at a spawn (worker pid); after a SIGKILL we did not send, what they (or jetsam) say
    oom_baseline: Callable[[int], oomkill.Baseline] = oomkill.baseline
    oom_evidence: Callable[[oomkill.Baseline], OomEvidence | None] = oomkill.evidence
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    notifier: Notifier = field(default_factory=Notifier)
