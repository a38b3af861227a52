"""Taking a run over: what a supervisor does before its first attempt — also when it follows one that died.

Its past comes back from the journal (`policy.recall`); a person's `trainctl resume` grants a fresh
restart budget, said and journaled; a worker left by a previous supervisor gets its grace period to
checkpoint and exit; leftovers of interrupted writes go, once no worker can be writing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import filelock

from trainctl.contract import fsio
from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import ORPHAN_GRACE_SECONDS
from trainctl.contract.runfolder import WORKER_LOCK

from .host import Host
from .policy import CLEAN, Attempt

Record = Callable[..., None]   # journal an event of this supervisor: record(event, step=None, **data)
Echo = Callable[[str], None]


def grant_fresh_budget(history: list[Attempt], record: Record, echo: Echo) -> None:
    """A person resumed the run: the failures so far stop counting toward the crash-loop budget."""
    failed = [a for a in history if a.kind not in CLEAN]
    if failed:
        record(Event.BUDGET_RESET, attempts=len(history), failed=len(failed))
        echo(f"resumed by hand: a fresh restart budget ({len(failed)} earlier failed attempt(s) no longer count "
             f"toward max_restarts_per_profile and same_step_limit)")


def settle_orphans(host: Host, run_dir: Path, record: Record, echo: Echo) -> None:
    """A worker left by a supervisor that died gets its grace period, then is killed."""
    found = host.find_orphans(run_dir)
    if not found:
        return
    echo(f"an orphaned worker of a previous supervisor is still running (pid {', '.join(str(p.pid) for p in found)}):"
         f" letting it checkpoint and exit")
    for pid, killed in host.settle_orphans(found, ORPHAN_GRACE_SECONDS + 5):
        record(Event.ORPHAN, pid=pid, killed=killed)
        if killed:
            echo(f"orphaned worker {pid} did not exit in time: killed its process group")


def remove_interrupted_writes(run_dir: Path, echo: Echo) -> None:
    """Leftovers of interrupted writes in the run folder, when no worker can be writing."""
    lock = filelock.FileLock(Path(run_dir) / WORKER_LOCK)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return   # an orphaned worker is still finishing: its files are its own
    try:
        for name in fsio.remove_stale_temps(run_dir):
            echo(f"removed {name} (an interrupted write)")
    finally:
        lock.release()
