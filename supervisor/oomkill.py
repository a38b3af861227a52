"""Was the worker killed for memory? The system's own records, read at spawn and after a SIGKILL, never per poll.

Linux: the kernel counts every OOM kill twice: in `/proc/vmstat` (`oom_kill`, the whole machine) and in the
victim's memory cgroup (`oom_kill` in `memory.events` on cgroup v2 — hierarchical, so a child cgroup's kill
counts too — or in `memory.oom_control` on v1). The counters are read when the worker is spawned and again
after it dies of a SIGKILL nobody in trainctl sent. The worker's cgroup decides when it can be read: a rise
is the kernel's word that it OOM-killed a process there, no rise its word that it did not (a rise of
/proc/vmstat alone is then some other process's OOM kill). Without a cgroup counter, /proc/vmstat decides.

macOS: jetsam, the memory-pressure killer, leaves a report in the diagnostic-reports folders (below).
After an unexplained SIGKILL, a report newer than the worker's start that names the worker's pid as
killed (with a `reason`) is the evidence.

Every path is a parameter, so tests feed these readers fixture files.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from .classify import OomEvidence

PROC = Path("/proc")
SYS_CGROUP = Path("/sys/fs/cgroup")
VMSTAT_LABEL = "/proc/vmstat"
# Where ReportCrash/osanalyticshelper writes jetsam reports; older ones move to Retired/ inside each.
JETSAM_SYSTEM_FOLDER = Path("/Library/Logs/DiagnosticReports")
JETSAM_USER_FOLDER = "~/Library/Logs/DiagnosticReports"
JETSAM_BUG_TYPE = "298"
JETSAM_WAIT_SECONDS = 3.0       # macOS writes the report a moment after the kill: look again for this long
JETSAM_CLOCK_SLACK = 1.0        # the report's time (10 ms steps) against our spawn time, both wall clocks
MAX_REPORT_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Counter:
    """One oom_kill counter: its file, how people call it, and its value when read."""
    label: str               # "cgroup memory.events", "cgroup memory.oom_control", "/proc/vmstat"
    path: Path
    value: int
    cgroup: str = ""         # the cgroup's own path ("/system.slice/trainctl.service"), for cgroup counters


@dataclass(frozen=True)
class Baseline:
    """The counters as an attempt began, and when (wall clock: jetsam reports carry wall-clock times)."""
    pid: int
    started: float
    cgroup: Counter | None = None
    vmstat: Counter | None = None


def baseline(pid: int, proc_root: Path = PROC, sys_root: Path = SYS_CGROUP,
             clock: Callable[[], float] = time.time) -> Baseline:
    """Read the OOM counters at the worker's spawn: its cgroup's (ours if it is already gone) and the kernel's."""
    cgroup = cgroup_counter(pid, proc_root, sys_root) or cgroup_counter("self", proc_root, sys_root)
    return Baseline(pid, clock(), cgroup, vmstat_counter(proc_root))


def evidence(before: Baseline, jetsam_folders: list[Path] | None = None, jetsam_wait: float | None = None,
             sleep: Callable[[float], None] = time.sleep) -> OomEvidence | None:
    """After the worker's SIGKILL: the kernel's counters against `before`; without them, a jetsam report.
    None when the system keeps no record that could tell (no counters, no report)."""
    found = kernel_evidence(before)
    if found is not None:
        return found
    if jetsam_wait is None:
        jetsam_wait = JETSAM_WAIT_SECONDS if sys.platform == "darwin" else 0.0
    folders = jetsam_folders if jetsam_folders is not None else default_jetsam_folders()
    deadline = time.monotonic() + jetsam_wait
    while True:
        report = jetsam_report(before.pid, before.started, folders)
        if report is not None or time.monotonic() >= deadline:
            return report
        sleep(0.25)


# ---- Linux: the kernel's oom_kill counters ---------------------------------------------------------------
def kernel_evidence(before: Baseline) -> OomEvidence | None:
    """The counters' rise since `before`: the cgroup's decides when it can be read again, else /proc/vmstat's."""
    system = _rise(before.vmstat)
    own = _rise(before.cgroup)
    if own is not None:
        counter = before.cgroup
        if own > 0:
            return OomEvidence(True, f"{counter.label} oom_kill +{own} ({counter.cgroup})")
        elsewhere = f"; /proc/vmstat +{system}: another process's" if system else ""
        return OomEvidence(False, f"no oom_kill increment ({counter.label} of {counter.cgroup}{elsewhere})")
    if system is not None:
        if system > 0:
            return OomEvidence(True, f"kernel oom_kill counter +{system} ({VMSTAT_LABEL})")
        return OomEvidence(False, f"no oom_kill increment ({VMSTAT_LABEL})")
    return None


def vmstat_counter(proc_root: Path = PROC) -> Counter | None:
    """The machine-wide count of OOM kills since boot (Linux 4.13 and later)."""
    path = proc_root / "vmstat"
    value = read_oom_kill(path)
    return Counter(VMSTAT_LABEL, path, value) if value is not None else None


def cgroup_counter(pid: int | str, proc_root: Path = PROC, sys_root: Path = SYS_CGROUP) -> Counter | None:
    """The oom_kill counter of the memory cgroup process `pid` is in, if this system has one we can read."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    for label, path, cgroup in cgroup_files(text, sys_root):
        value = read_oom_kill(path)
        if value is not None:
            return Counter(label, path, value, cgroup)
    return None


def cgroup_files(proc_cgroup: str, sys_root: Path = SYS_CGROUP) -> list[tuple[str, Path, str]]:
    """Where the counter of a /proc/<pid>/cgroup's memory cgroup may be: (label, file, cgroup path), best first.
    v2's line is `0::/path` (mounted at the root, or at unified/ on a hybrid system); v1's memory line is
    `N:memory:/path` (or `N:memory,other:/path`)."""
    found = []
    for line in proc_cgroup.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if not cgroup.startswith("/"):
            continue
        relative = cgroup.lstrip("/")
        if number == "0" and controllers == "":
            found += [("cgroup memory.events", sys_root / relative / "memory.events", cgroup),
                      ("cgroup memory.events", sys_root / "unified" / relative / "memory.events", cgroup)]
        elif "memory" in controllers.split(","):
            found.append(("cgroup memory.oom_control", sys_root / "memory" / relative / "memory.oom_control", cgroup))
    # v2 first; on a hybrid system (v2 at unified/, memory on v1) the v2 files are absent and v1's is read
    return sorted(found, key=lambda f: f[0] != "cgroup memory.events")


def read_oom_kill(path: Path) -> int | None:
    """The `oom_kill N` line of a vmstat/memory.events/memory.oom_control file; None if absent or unreadable."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def _rise(before: Counter | None) -> int | None:
    """How much a counter grew since `before`; None if it cannot be read now or went backwards (a new cgroup)."""
    if before is None:
        return None
    now = read_oom_kill(before.path)
    return now - before.value if now is not None and now >= before.value else None


# ---- macOS: jetsam reports -------------------------------------------------------------------------------
# A jetsam report is `JetsamEvent-YYYY-MM-DD-HHMMSS.ips` (bug_type 298). Its first line is a JSON header,
#   {"bug_type":"298","timestamp":"2026-12-01 03:15:22.00 -0800","os_version":"macOS 15.1 (24B83)",...}
# and the rest of the file one JSON object, the body. The fields relied on here:
#   header "bug_type"          "298" for a jetsam event (a string; accepted as a number too)
#   header "timestamp"         when the event happened, "%Y-%m-%d %H:%M:%S.%f %z" (body "date" as a fallback,
#                              then the file's mtime)
#   body "processes"           every process jetsam looked at: [{"pid": 4242, "name": "python3.12", ...}]
#   process "reason"           present only on the process(es) jetsam killed: "per-process-limit",
#                              "vm-pageshortage", "vm-thrashing", "fc-thrashing", "highwater", ...
# A process listed without a "reason" was only measured, not killed. Other fields (rpages, states, uuid,
# memoryStatus, largestProcess) are not needed.
def default_jetsam_folders() -> list[Path]:
    """The system's and the user's diagnostic-reports folders, each with its Retired/ folder."""
    roots = [JETSAM_SYSTEM_FOLDER, Path(os.path.expanduser(JETSAM_USER_FOLDER))]
    return [folder for root in roots for folder in (root, root / "Retired")]


def jetsam_report(pid: int, since: float, folders: list[Path]) -> OomEvidence | None:
    """The newest jetsam report written since `since` (wall clock) that names `pid` as killed."""
    candidates = []
    for folder in folders:
        try:
            candidates += [p for p in folder.glob("JetsamEvent-*.ips") if p.stat().st_mtime >= since - JETSAM_CLOCK_SLACK]
        except OSError:
            continue
    for path in sorted(candidates, key=lambda p: p.name, reverse=True):
        report = read_jetsam(path)
        if report is None or report[0] < since - JETSAM_CLOCK_SLACK:
            continue
        for process in report[1]:
            if process.get("pid") == pid and process.get("reason"):
                return OomEvidence(True, f"jetsam report {path.name} ({process['reason']})")
    return None


def read_jetsam(path: Path) -> tuple[float, list[dict]] | None:
    """(when, processes) of a jetsam report; None for a file that is not one or cannot be read."""
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            return None
        header_line, _, rest = path.read_text(errors="replace").partition("\n")
        header, body = json.loads(header_line), json.loads(rest)
        mtime = path.stat().st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or not isinstance(body, dict) or str(header.get("bug_type")) != JETSAM_BUG_TYPE:
        return None
    processes = [p for p in body.get("processes") or [] if isinstance(p, dict)]
    return _when(header.get("timestamp")) or _when(body.get("date")) or mtime, processes


def _when(text) -> float | None:
    """A jetsam timestamp ("2026-12-01 03:15:22.00 -0800") as seconds since the epoch."""
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f %z").timestamp()
    except (TypeError, ValueError):
        return None
