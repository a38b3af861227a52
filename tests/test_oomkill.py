"""Knowing an OOM kill: the kernel's oom_kill counters and macOS jetsam reports, read from fixture files (the
paths are parameters), the loop's wiring with a fake host, and this Linux machine's real files and a real SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainctl.contract import fsio
from trainctl.contract.config import load
from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import ExitCode, Phase, read_heartbeat
from trainctl.contract.runfolder import HEARTBEAT_FILE
from trainctl.supervisor import oomkill
from trainctl.supervisor.classify import Exit, Kind, MemorySample, OomEvidence, classify
from trainctl.supervisor.host import Host
from trainctl.supervisor.notify import Notifier
from trainctl.supervisor.supervise import Supervisor

from conftest import LONG, config_text, events, make_run, wait_for, write_file

GiB = 2**30
PID = 4242
CALM = [MemorySample(at=t, worker=GiB, available=20 * GiB, total=24 * GiB) for t in range(5)]
USER_SERVICE = "/user.slice/user-1000.slice/user@1000.service/app.slice/trainctl-night.service"
V2_CGROUP = f"0::{USER_SERVICE}\n"
# A hybrid (v1 + unified) system such as this CI machine: the v1 memory controller holds the counter.
V1_CGROUP = ("9:name=systemd:/\n8:pids:/\n4:memory:/process_api/a073c694\n3:cpuset:/\n1:cpu,cpuacct:/\n0::/\n")


def vmstat(oom_kill: int) -> str:
    return ("nr_free_pages 3456789\nnr_zone_inactive_anon 12345\npgfault 987654321\npgmajfault 4321\n"
            f"oom_kill {oom_kill}\nnr_unstable 0\n")


def memory_events(oom_kill: int) -> str:
    return f"low 0\nhigh 0\nmax {3 * oom_kill}\noom {oom_kill}\noom_kill {oom_kill}\noom_group_kill 0\n"


def oom_control(oom_kill: int) -> str:
    return f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kill}\n"


def v2_machine(proc, sys_root, vm=3, cg=0):
    write_file(proc / "vmstat", vmstat(vm))
    write_file(proc / str(PID) / "cgroup", V2_CGROUP)
    return write_file(sys_root / USER_SERVICE.lstrip("/") / "memory.events", memory_events(cg))


# ---- Linux counters, from fixture files -------------------------------------------------------------------
def test_a_rise_of_the_workers_cgroup_counter_is_a_certain_oom(roots):
    proc, sys_root = roots
    events_file = v2_machine(proc, sys_root)
    before = oomkill.baseline(PID, proc, sys_root)
    assert before.cgroup.value == 0 and before.vmstat.value == 3
    write_file(events_file, memory_events(1))
    write_file(proc / "vmstat", vmstat(4))
    found = oomkill.evidence(before, jetsam_folders=[], jetsam_wait=0)
    assert found == OomEvidence(True, f"cgroup memory.events oom_kill +1 ({USER_SERVICE})")
    failure = classify(Exit(-signal.SIGKILL, oom_evidence=found), CALM, 20 * GiB)
    assert failure.kind is Kind.OOM and "cgroup memory.events oom_kill +1" in failure.detail
    assert "guess" not in failure.detail and failure.decided_by == found.said


def test_no_rise_in_the_cgroup_is_no_oom_even_when_another_process_was_oom_killed(roots):
    proc, sys_root = roots
    v2_machine(proc, sys_root)
    before = oomkill.baseline(PID, proc, sys_root)
    write_file(proc / "vmstat", vmstat(4))                   # the kernel killed something, outside our cgroup
    found = oomkill.evidence(before, jetsam_folders=[], jetsam_wait=0)
    assert not found.oom_killed
    assert "no oom_kill increment (cgroup memory.events" in found.said and "another process" in found.said
    assert classify(Exit(-signal.SIGKILL, oom_evidence=found), CALM, 20 * GiB).kind is Kind.KILLED


def test_a_v1_memory_cgroup_counts_on_a_hybrid_system(roots):
    proc, sys_root = roots
    write_file(proc / "vmstat", vmstat(0))
    write_file(proc / str(PID) / "cgroup", V1_CGROUP)
    control = write_file(sys_root / "memory/process_api/a073c694/memory.oom_control", oom_control(2))
    write_file(sys_root / "unified/cgroup.procs", "1\n")     # the v2 root has no memory.events
    before = oomkill.baseline(PID, proc, sys_root)
    assert before.cgroup.path == control and before.cgroup.value == 2
    write_file(control, oom_control(3))
    assert oomkill.kernel_evidence(before) == OomEvidence(
        True, "cgroup memory.oom_control oom_kill +1 (/process_api/a073c694)")


def test_proc_vmstat_decides_when_there_is_no_cgroup_counter(roots):
    proc, sys_root = roots
    write_file(proc / "vmstat", vmstat(7))
    write_file(proc / str(PID) / "cgroup", "0::/\n")         # the root cgroup: no memory.events
    before = oomkill.baseline(PID, proc, sys_root)
    assert before.cgroup is None
    assert oomkill.kernel_evidence(before) == OomEvidence(False, "no oom_kill increment (/proc/vmstat)")
    write_file(proc / "vmstat", vmstat(8))
    assert oomkill.kernel_evidence(before) == OomEvidence(True, "kernel oom_kill counter +1 (/proc/vmstat)")


def test_a_worker_gone_before_its_cgroup_was_read_gets_the_supervisors(roots):
    proc, sys_root = roots
    v2_machine(proc, sys_root)
    os.rename(proc / str(PID), proc / "self")
    before = oomkill.baseline(PID, proc, sys_root)
    assert before.cgroup is not None and before.cgroup.cgroup == USER_SERVICE


def test_a_cgroup_that_went_away_or_was_recreated_falls_back_to_proc_vmstat(roots):
    proc, sys_root = roots
    events_file = v2_machine(proc, sys_root, cg=5)
    before = oomkill.baseline(PID, proc, sys_root)
    write_file(events_file, memory_events(0))                 # recreated: counting from 0 again
    assert oomkill.kernel_evidence(before).said == "no oom_kill increment (/proc/vmstat)"
    events_file.unlink()
    write_file(proc / "vmstat", vmstat(4))
    assert oomkill.kernel_evidence(before).said == "kernel oom_kill counter +1 (/proc/vmstat)"


def test_without_any_counter_or_report_there_is_no_evidence(roots, tmp_path):
    proc, sys_root = roots
    before = oomkill.baseline(PID, proc, sys_root)        # not Linux: no /proc at all
    assert before.cgroup is None and before.vmstat is None
    assert oomkill.evidence(before, jetsam_folders=[tmp_path / "none"], jetsam_wait=0) is None


@pytest.mark.parametrize("text,labels", [
    (V2_CGROUP, ["cgroup memory.events", "cgroup memory.events"]),
    ("5:cpu,memory:/night\n", ["cgroup memory.oom_control"]),
    (V1_CGROUP, ["cgroup memory.events", "cgroup memory.events", "cgroup memory.oom_control"]),
    ("garbage\n\n12:pids\n", []),
])
def test_cgroup_files_are_found_for_v1_v2_and_hybrid_systems(text, labels, tmp_path):
    assert [label for label, _, _ in oomkill.cgroup_files(text, tmp_path)] == labels


# ---- macOS jetsam reports, as fixture files -----------------------------------------------------------
def jetsam_ips(folder: Path, when: float, processes: list[dict], bug_type="298", mtime: float | None = None) -> Path:
    """A JetsamEvent .ips as macOS writes it: a JSON header line, then the JSON body."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + ".00 " + time.strftime("%z", time.localtime(when))
    header = {"bug_type": bug_type, "timestamp": stamp, "os_version": "macOS 15.1 (24B83)",
              "incident_id": "5C1B9D2E-0000-4F4A-9F3B-1A2B3C4D5E6F"}
    body = {"crashReporterKey": "c0ffee", "kernel": "Darwin Kernel Version 24.1.0", "product": "Mac14,9",
            "incident": header["incident_id"], "date": stamp, "build": "macOS 15.1 (24B83)", "timeDelta": 7,
            "memoryStatus": {"compressorSize": 912345, "memoryPages": {"free": 3021, "active": 250000}},
            "largestProcess": "python3.12", "genCounter": 0,
            "processes": [{"uuid": "7d3a", "states": ["daemon"], "age": 12345, "purgeable": 0, "fds": 40,
                           "coalition": 800, "rpages": 1200, "priority": 0, "physicalPages": {"internal": [1, 2]},
                           "freeze_skip_reason:": " ", "cpuTime": 1.5, "lifetimeMax": 3000, **p}
                          for p in processes]}
    name = f"JetsamEvent-{time.strftime('%Y-%m-%d-%H%M%S', time.localtime(when))}.ips"
    path = write_file(folder / name, json.dumps(header) + "\n" + json.dumps(body, indent=2))
    os.utime(path, (mtime or when, mtime or when))
    return path


def test_a_jetsam_report_naming_the_worker_after_its_start_is_oom_evidence(tmp_path):
    start = time.time() - 600
    system, user = tmp_path / "Library/Logs/DiagnosticReports", tmp_path / "home/Library/Logs/DiagnosticReports"
    folders = [system, system / "Retired", user, user / "Retired"]
    before = oomkill.Baseline(PID, start)
    # before the worker started (a pid from an earlier boot), though copied since: its own timestamp counts
    jetsam_ips(system, start - 3600, [{"pid": PID, "name": "python3.12", "reason": "per-process-limit"}],
               mtime=start + 60)
    jetsam_ips(user, start + 100, [{"pid": PID + 1, "name": "Safari", "reason": "vm-pageshortage"},
                                   {"pid": PID, "name": "python3.12"}])       # listed, not killed
    write_file(system / "JetsamEvent-2026-12-01-999999.ips", "{\"bug_type\":\"298\"}\nnot json")
    jetsam_ips(user, start + 200, [{"pid": PID, "name": "python3.12", "reason": "per-process-limit"}],
               bug_type="309")                                                # a crash report, not jetsam
    assert oomkill.jetsam_report(PID, start, folders) is None
    report = jetsam_ips(system / "Retired", start + 300,
                        [{"pid": 77, "name": "mds"}, {"pid": PID, "name": "python3.12", "reason": "per-process-limit"}])
    found = oomkill.evidence(before, jetsam_folders=folders, jetsam_wait=0)
    assert found == OomEvidence(True, f"jetsam report {report.name} (per-process-limit)")
    failure = classify(Exit(-signal.SIGKILL, oom_evidence=found), CALM, 20 * GiB)
    assert failure.kind is Kind.OOM and f"jetsam report {report.name}" in failure.detail


def test_a_jetsam_report_written_a_moment_after_the_kill_is_waited_for(tmp_path):
    start = time.time() - 60
    looks = []

    def report_appears(seconds):
        looks.append(seconds)
        jetsam_ips(tmp_path, start + 30, [{"pid": PID, "name": "python3.12", "reason": "vm-pageshortage"}])

    before = oomkill.Baseline(PID, start)
    assert oomkill.evidence(before, jetsam_folders=[tmp_path], jetsam_wait=0, sleep=report_appears) is None
    found = oomkill.evidence(before, jetsam_folders=[tmp_path], jetsam_wait=30, sleep=report_appears)
    assert found.oom_killed and "(vm-pageshortage)" in found.said and looks


def test_the_default_jetsam_folders_are_the_system_and_user_ones_with_retired():
    folders = [str(f) for f in oomkill.default_jetsam_folders()]
    assert folders[:2] == ["/Library/Logs/DiagnosticReports", "/Library/Logs/DiagnosticReports/Retired"]
    assert folders[2] == os.path.expanduser("~/Library/Logs/DiagnosticReports") and folders[3].endswith("/Retired")


# ---- the loop: counters at spawn, evidence only after a SIGKILL (fake host, no process) --------------------
class FakeWorker:
    """Beats once a second, then ends with `rc` at t = 3."""

    def __init__(self, world, pid, attempt, rung_index, rc):
        self.world, self.pid, self.attempt, self.rung_index, self.rc_at_end = world, pid, attempt, rung_index, rc
        self.born, self.rc = world.now, None

    def poll(self):
        t = self.world.now - self.born
        if self.rc is None and t >= 3:
            self.rc = self.rc_at_end
        elif self.rc is None:
            fsio.atomic_write_json(self.world.run_dir / HEARTBEAT_FILE, {
                "pid": self.pid, "attempt": self.attempt, "rung_index": self.rung_index, "beat": int(t * 10) + 1,
                "phase": "training", "step": int(t), "epoch": 0, "cursor": int(t) * 16}, durable=False)
        return self.rc

    def wait(self, timeout):
        self.world.now += timeout
        return self.poll()

    def signal(self, sig):
        pass

    def kill_group(self):
        pass

    def stop(self, timeout):
        self.rc = ExitCode.STOPPED
        return self.rc

    def release(self):
        pass


class FakeWorld:
    def __init__(self, run_dir, endings):
        self.run_dir, self.endings, self.now, self.workers = run_dir, list(endings), 0.0, []
        self.baselines, self.asked = [], []

    def spawn(self, run_dir, rung_index, attempt, describe):
        self.workers.append(FakeWorker(self, 90000 + attempt, attempt, rung_index, self.endings.pop(0)))
        return self.workers[-1]

    def baseline(self, pid):
        self.baselines.append(pid)
        return oomkill.Baseline(pid, 0.0)

    def evidence(self, before):
        self.asked.append(before.pid)
        return OomEvidence(True, f"cgroup memory.events oom_kill +1 ({USER_SERVICE})")

    def sleep(self, seconds):
        self.now += seconds

    def host(self):
        return Host(spawn=self.spawn, find_orphans=lambda run_dir: [], settle_orphans=lambda found, grace: [],
                    sample_memory=lambda pid, reported: MemorySample(self.now, GiB, 20 * GiB, 24 * GiB),
                    total_memory=lambda: 24 * GiB, clock=lambda: self.now, sleep=self.sleep, notifier=Notifier(""),
                    oom_baseline=self.baseline, oom_evidence=self.evidence)


def test_the_loop_reads_the_counters_at_spawn_and_asks_only_after_a_sigkill(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"the loop started a process: {a}"))
    text = config_text("loop", dataset, supervisor={"backoff_seconds": [2.0], "poll_seconds": 0.5, "keep_awake": False})
    run_dir = make_run(tmp_path, "loop", text)
    world = FakeWorld(run_dir, [ExitCode.INTERNAL_ERROR, -signal.SIGKILL, ExitCode.OK])
    assert Supervisor(run_dir, load(run_dir / "config.toml"), world.host(), echo=lambda line: None).run() == 0
    assert world.baselines == [90001, 90002, 90003] and world.asked == [90002]   # one look, at the SIGKILL only
    ends = [e["data"] for e in events(run_dir, Event.EXIT)]
    assert [e["failure"] for e in ends] == ["exception", "oom", "done"]
    assert ends[1]["decided_by"] == f"cgroup memory.events oom_kill +1 ({USER_SERVICE})"
    assert events(run_dir, Event.STEP_DOWN)[0]["data"]["to"] == 1            # an OOM steps down at once


# ---- this Linux machine: the real files, a real SIGKILL ---------------------------------------------------
linux_only = pytest.mark.skipif(not Path("/proc/vmstat").exists(), reason="the kernel's counters are Linux's")


@linux_only
def test_the_readers_find_this_machines_real_counters():
    before = oomkill.baseline(os.getpid())
    assert isinstance(before.vmstat.value, int) and before.vmstat.path == Path("/proc/vmstat")
    assert before.cgroup is not None, f"no memory cgroup counter found from {Path('/proc/self/cgroup').read_text()!r}"
    assert isinstance(before.cgroup.value, int) and before.cgroup.path.is_file()


@linux_only
def test_a_real_sigkill_without_an_oom_is_killed_and_says_why(tmp_path, dataset):
    run_dir = make_run(tmp_path, "kill9", config_text("kill9", dataset, train=LONG))
    proc = subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        hb = wait_for(lambda: (hb := read_heartbeat(run_dir)) and hb.phase is Phase.TRAINING and hb.step >= 2 and hb,
                      120, what="the worker training")
        os.kill(hb.pid, signal.SIGKILL)
        crash = wait_for(lambda: events(run_dir, Event.EXIT), 60, what="the SIGKILL's exit event")[0]["data"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert crash["failure"] == "killed" and crash["signal"] == "SIGKILL", out
    assert "no oom_kill increment" in crash["detail"] and "no oom_kill increment" in crash["decided_by"]
