"""Acting before the kill (issue 20 §2, §5), with real workers: a leaking worker recycled on its own rung, and the
system's memory pressure (a real PSI file the supervisor reads) stopping a worker at a checkpoint one rung up."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

from trainctl.contract.config import load
from trainctl.contract.lifecycle import State
from trainctl.contract.protocol import ExitCode, read_heartbeat
from trainctl.supervisor.host import Host
from trainctl.supervisor.pressure import Reader
from trainctl.supervisor.runstate import read_state
from trainctl.supervisor.status import gather
from trainctl.supervisor.supervise import Supervisor

from conftest import LONG, assert_same_weights, config_text, events, make_run, wait_for

NORMAL = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
WARNING = "some avg10=15.00 avg60=4.00 avg300=1.00 total=900\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=50\n"
CRITICAL = "some avg10=71.30 avg60=40.02 avg300=12.00 total=9100\nfull avg10=38.50 avg60=20.00 avg300=6.00 total=5200\n"


def test_a_leaking_worker_is_recycled_on_its_rung_losing_no_step_and_ends_bit_identical(tmp_path, dataset,
                                                                                        long_reference):
    """The `leak` fault keeps 40 MB more at every optimizer step; recycle_growth = 300MB restarts the worker fresh on
    the same rung whenever it has grown that much past its first steps: planned, no budget, nothing lost."""
    run_dir = make_run(tmp_path, "leaky", config_text("leaky", dataset, train=LONG, supervisor={
        "recycle_growth": "300MB", "max_restarts_per_profile": 0}))   # a failure would step down: none may come
    env = {**os.environ, "TRAINCTL_FAULTS": "train_step:leak"}
    result = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == ExitCode.OK and read_state(run_dir).state == State.SUCCEEDED, result.stdout + result.stderr
    exits, spawns = events(run_dir, "exit"), events(run_dir, "spawn")
    assert len(events(run_dir, "recycle")) == len(exits) - 1 >= 1, result.stdout
    assert [e["data"]["failure"] for e in exits] == ["recycled"] * (len(exits) - 1) + ["done"]
    assert {e["rung"] for e in spawns} == {0} and read_state(run_dir).restarts == 0
    for ended, next_one in zip(exits, spawns[1:]):   # each fresh worker starts where the recycled one stopped
        assert next_one["step"] == ended["step"], (ended, next_one)
    assert events(run_dir, "restart") == [] and events(run_dir, "step_down") == []
    assert_same_weights(run_dir, long_reference)
    assert f"workers recycled: {len(exits) - 1} (" in (run_dir / "report.md").read_text()


def test_memory_pressure_warning_then_critical_checkpoints_then_steps_down_losing_nothing(tmp_path, dataset):
    """A real supervisor loop and real workers; the pressure file is the test's (the reader's root is injectable).
    Warning from step 3: a checkpoint now, training goes on, status shows it. Then critical: the worker checkpoints
    and stops, and rung 2 resumes at that very step."""
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True)
    psi = proc / "pressure" / "memory"
    psi.write_text(NORMAL)
    run_dir = make_run(tmp_path, "pressed", config_text("pressed", dataset, train={"epochs": 40}))
    host = Host(pressure_reader=lambda thresholds: Reader(thresholds, proc_root=proc, sys_root=tmp_path / "no-cgroup"))
    supervisor = Supervisor(run_dir, load(run_dir / "config.toml"), host, echo=lambda line: None)
    seen = {}

    def training(attempt: int, past: int) -> bool:
        hb = read_heartbeat(run_dir)
        return hb is not None and hb.attempt == attempt and hb.step > past

    def press():   # the machine runs short of memory while the first worker trains, and recovers after its stop
        wait_for(lambda: training(1, 2), timeout=300)
        psi.write_text(WARNING)
        wait_for(lambda: (gather(run_dir).memory.get("pressure") or {}).get("level") == "warning", timeout=300)
        seen["status"] = gather(run_dir).memory["pressure"]
        psi.write_text(CRITICAL)
        wait_for(lambda: supervisor.attempt > 1, timeout=300)
        psi.write_text(NORMAL)
        # the attempt's number rises before its spawn event reaches the journal: wait for the event itself
        wait_for(lambda: len(spawns := events(run_dir, "spawn")) > 1 and training(2, spawns[1]["step"]), timeout=300)
        supervisor.request_stop()   # rung 2 trains: enough seen

    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    assert supervisor.run() == ExitCode.OK
    presser.join(timeout=60)
    assert seen["status"] == {"level": "warning", "source": "/proc/pressure/memory", "some_avg10": 15.0,
                              "full_avg10": 0.5}
    actions = [(e["data"]["level"], e["data"]["action"]) for e in events(run_dir, "memory_pressure")]
    assert actions[:2] == [("warning", "checkpoint"), ("critical", "step_down")]
    # (the warning's SIGUSR1 is answered by the next snapshot, which may be an epoch end's: the loop test checks it)
    first = events(run_dir, "exit")[0]
    assert first["data"]["failure"] == "memory_limit" and "under memory pressure (critical" in first["data"]["detail"]
    second = events(run_dir, "spawn")[1]
    assert (second["rung"], second["step"]) == (1, first["step"])   # nothing lost: rung 2 starts at the stop's step
    assert read_state(run_dir).state == State.STOPPED
    assert "memory pressure: warning: checkpoint x1, critical: step_down x1" in (run_dir / "report.md").read_text()
