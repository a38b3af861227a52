"""Memory observation with psutil: the worker's whole process tree, the system, swap."""
from __future__ import annotations

import time

import psutil

from .classify import MemorySample


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (DataLoader workers included), in bytes."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass   # exited between listing and reading
    return total


def sample(pid: int, reported: int = 0) -> MemorySample:
    """One MemorySample; `reported` is accelerator memory the worker reports (MPS: not in RSS)."""
    vm = psutil.virtual_memory()
    return MemorySample(at=time.monotonic(), worker=tree_rss(pid) + reported, available=vm.available,
                        total=vm.total, swap_used=psutil.swap_memory().used)


def total_memory() -> int:
    return psutil.virtual_memory().total
