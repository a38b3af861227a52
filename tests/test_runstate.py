"""The single-supervisor lock: status probes must never make a real start fail; a real holder always does."""
from __future__ import annotations

import threading

import filelock
import pytest

from trainctl.contract.runfolder import SUPERVISOR_LOCK
from trainctl.supervisor import runstate


def test_a_start_waits_out_a_probe_that_holds_the_lock_at_that_instant(tmp_path):
    """Found by the soak: `supervisor_alive` (status, service checks) takes the lock for an instant; a start
    that tried exactly then was refused as 'already running'. Here the probe holds it, for sure, at the
    moment the start tries, and lets go a little later: the start must wait, then succeed."""
    probe = filelock.FileLock(tmp_path / SUPERVISOR_LOCK)
    probe.acquire()
    trying, outcome = threading.Event(), {}

    def start():
        trying.set()
        try:
            outcome["lock"] = runstate.acquire(tmp_path)
        except runstate.AlreadyRunning as e:
            outcome["refused"] = e
    starter = threading.Thread(target=start)
    starter.start()
    trying.wait()
    starter.join(timeout=0.2)      # the start is trying while the probe still holds the lock
    probe.release()
    starter.join()
    assert "refused" not in outcome, outcome.get("refused")
    assert runstate.supervisor_alive(tmp_path)          # the start holds the lock now
    outcome["lock"].release()


def test_a_real_holder_is_still_refused(tmp_path):
    holder = runstate.acquire(tmp_path)
    try:
        with pytest.raises(runstate.AlreadyRunning, match="already has a supervisor running"):
            runstate.acquire(tmp_path, timeout=0.5)
        assert runstate.supervisor_alive(tmp_path)
    finally:
        holder.release()
    assert not runstate.supervisor_alive(tmp_path)
