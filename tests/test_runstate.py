"""The single-supervisor lock: status probes must never make a real start fail."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from trainctl.supervisor import runstate

PROBE_LOOP = """
import sys, time
from trainctl.supervisor import runstate
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    runstate.supervisor_alive(sys.argv[1])   # what `trainctl status --watch` and service checks do
"""


def test_a_start_is_not_refused_because_someone_is_asking_whether_it_runs(tmp_path):
    """Found by the soak: a status probe holds the lock for microseconds; a start that tried it exactly
    then was refused as 'already running'. The start now waits out such probes."""
    prober = subprocess.Popen([sys.executable, "-c", PROBE_LOOP, str(tmp_path), "8"])
    try:
        time.sleep(2)   # the prober is importing, then probing as fast as it can
        for _ in range(200):
            runstate.acquire(tmp_path).release()
    finally:
        prober.kill()
        prober.wait()


def test_a_real_holder_is_still_refused(tmp_path):
    holder = runstate.acquire(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(runstate.AlreadyRunning, match="already has a supervisor running"):
            runstate.acquire(tmp_path)
        assert time.monotonic() - started < 5
        assert runstate.supervisor_alive(tmp_path)
    finally:
        holder.release()
    assert not runstate.supervisor_alive(tmp_path)
