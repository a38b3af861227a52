"""Memory pressure: PSI files and macOS levels parsed with tables, readers fed fixture trees for cgroup v2,
hybrid and v1 systems (and a fake sysctl for macOS), and this machine's real /proc/pressure/memory."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from trainctl.supervisor import pressure
from trainctl.supervisor.pressure import (MACOS_SYSCTL, SYSTEM_LABEL, Level, Reader, Reading, Thresholds,
                                          level_of_macos, level_of_psi, macos_level, parse_psi, read_psi, worst)

from conftest import write_file

T = Thresholds()
SERVICE = "/system.slice/x.service"
SERVICE_LABEL = f"cgroup memory.pressure ({SERVICE})"
# A hybrid (v1 + unified) system: the memory controller is on v1, the process sits in the v2 root.
HYBRID_CGROUP = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/a073c694\n3:cpuset:/\n1:cpu,cpuacct:/\n0::/\n"
V1_CGROUP = "11:memory:/system.slice/x.service\n4:cpu,cpuacct:/system.slice/x.service\n1:name=systemd:/system.slice\n"


def psi(some: float, full: float | None = 0.0) -> str:
    """A PSI memory file as the kernel writes it."""
    text = f"some avg10={some:.2f} avg60=1.15 avg300=0.31 total=1234567\n"
    return text + (f"full avg10={full:.2f} avg60=0.50 avg300=0.12 total=456789\n" if full is not None else "")


def v2_machine(proc: Path, sys_root: Path, system: str, cgroup: str) -> tuple[Path, Path]:
    """A cgroup v2 system: the supervisor in x.service, both pressure files present."""
    write_file(proc / "self" / "cgroup", f"0::{SERVICE}\n")
    return (write_file(proc / "pressure" / "memory", system),
            write_file(sys_root / SERVICE.lstrip("/") / "memory.pressure", cgroup))


# ---- pure functions, with tables ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", (0.0, 0.0)),
    (psi(12.5, 3.25), (12.5, 3.25)),
    (psi(12.5, None), (12.5, None)),                          # an old kernel's file, or a cpu-style one: no full
    ("full avg10=4.00 avg60=0 avg300=0 total=9\nsome avg10=7.00 avg60=0 avg300=0 total=9", (7.0, 4.0)),
    (psi(1.0, 0.5) + "later avg10=what\n", (1.0, 0.5)),       # a line a later kernel might add is ignored
    ("some avg10=100.00 avg60=99.00 avg300=90.00 total=1\n", (100.0, None)),
    ("", None),
    ("hello world\n", None),
    ("\x00\x00\x00", None),
    ("full avg10=1.00 avg60=0 avg300=0 total=0\n", None),     # no some line
    ("some avg60=1.00 avg300=0 total=0\n", None),             # no avg10
    ("some avg10= avg60=0 avg300=0 total=0\n", None),
    ("some avg10=1.2.3 avg60=0 avg300=0 total=0\n", None),
    ("some avg10=nan avg60=0 avg300=0 total=0\n", None),
    ("some avg10=inf avg60=0 avg300=0 total=0\n", None),
    ("some avg10=-1.00 avg60=0 avg300=0 total=0\n", None),
    ("some avg10=1.00 avg60=0 avg300=0 total=0\nfull avg10=NaN avg60=0 avg300=0 total=0\n", None),
    ("some avg10=1.00 avg60=0 avg300=0 total=0\nfull avg10=-0.5 avg60=0 avg300=0 total=0\n", None),
    (None, None),
    (b"some avg10=1.00 avg60=0 avg300=0 total=0\n", None),
])
def test_parse_psi(text, expected):
    assert parse_psi(text) == expected


@pytest.mark.parametrize("some,full,thresholds,expected", [
    (0.0, 0.0, T, Level.NORMAL),
    (9.99, 19.99, T, Level.NORMAL),
    (10.0, 0.0, T, Level.WARNING),                            # boundaries are inclusive
    (10.0, 19.99, T, Level.WARNING),
    (25.0, 20.0, T, Level.CRITICAL),
    (0.0, 20.0, T, Level.CRITICAL),                           # full alone decides critical
    (100.0, None, T, Level.WARNING),                          # without a full line, warning at most
    (9.99, None, T, Level.NORMAL),
    (4.0, 0.0, Thresholds(warning=4.0, critical=8.0), Level.WARNING),
    (50.0, 49.0, Thresholds(warning=60.0, critical=50.0), Level.NORMAL),
])
def test_level_of_psi(some, full, thresholds, expected):
    assert level_of_psi(some, full, thresholds) is expected


@pytest.mark.parametrize("value,expected", [
    (1, Level.NORMAL), (2, Level.WARNING), (4, Level.CRITICAL),
    (0, None), (3, None), (8, None), (-1, None), (True, None), (None, None), ("2", None), (2.0, None),
])
def test_level_of_macos(value, expected):
    assert level_of_macos(value) is expected


@pytest.mark.parametrize("field,value", [
    ("warning", 0), ("warning", -1.0), ("warning", 100.5), ("warning", math.nan), ("warning", math.inf),
    ("critical", True), ("critical", "20"), ("critical", None),
])
def test_thresholds_reject_what_is_not_a_percentage(field, value):
    with pytest.raises(ValueError, match=f"memory pressure {field} threshold"):
        Thresholds(**{field: value})


def test_the_default_thresholds_and_the_levels_order():
    assert (T.warning, T.critical) == (10.0, 20.0)
    assert [level.rank for level in (Level.NORMAL, Level.WARNING, Level.CRITICAL)] == [0, 1, 2]
    assert Level("critical") is Level.CRITICAL and Level.WARNING == "warning"


def normal(source="a", some=0.0):
    return Reading(Level.NORMAL, source, some, 0.0)


@pytest.mark.parametrize("readings,expected", [
    ([], None),
    ([normal("system")], normal("system")),
    ([normal("system"), Reading(Level.CRITICAL, "cgroup", 30.0, 25.0)], Reading(Level.CRITICAL, "cgroup", 30.0, 25.0)),
    ([Reading(Level.WARNING, "macos"), normal("b", 9.0)], Reading(Level.WARNING, "macos")),
    ([normal("first", 1.0), normal("second", 1.0)], normal("first", 1.0)),
    ([normal("first", 1.0), normal("second", 5.0)], normal("second", 5.0)),  # among equals, the most stall
])
def test_worst(readings, expected):
    assert worst(readings) == expected


def test_a_reading_is_strict_json():
    reading = Reading(Level.WARNING, SYSTEM_LABEL, 12.5, None)
    assert reading.to_json() == {"level": "warning", "source": SYSTEM_LABEL, "some_avg10": 12.5, "full_avg10": None}
    odd = Reading(Level.CRITICAL, "x", math.nan, math.inf)
    assert json.loads(json.dumps(odd.to_json(), allow_nan=False)) == {"level": "critical", "source": "x",
                                                                      "some_avg10": None, "full_avg10": None}


# ---- reading files, from fixture trees ---------------------------------------------------------------------
def test_read_psi(tmp_path):
    path = write_file(tmp_path / "memory", psi(11.0, 2.0))
    assert read_psi(path, "here", T) == Reading(Level.WARNING, "here", 11.0, 2.0)
    assert read_psi(tmp_path / "absent", "here", T) is None
    assert read_psi(tmp_path, "a folder", T) is None
    assert read_psi(write_file(tmp_path / "junk", "oom_kill 3\n"), "junk", T) is None
    (tmp_path / "binary").write_bytes(b"\xff\xfe some avg10=1")
    assert read_psi(tmp_path / "binary", "binary", T) is None


def test_a_cgroup_v2_system_reads_both_and_the_cgroups_critical_beats_the_systems_normal(roots):
    proc, sys_root = roots
    v2_machine(proc, sys_root, psi(0.5, 0.0), psi(45.0, 21.5))
    reader = Reader(T, proc, sys_root, platform="linux")
    assert reader.available and reader.sources == [SYSTEM_LABEL, SERVICE_LABEL]
    assert reader.read() == Reading(Level.CRITICAL, SERVICE_LABEL, 45.0, 21.5)


def test_each_read_sees_the_files_now(roots):
    proc, sys_root = roots
    system, cgroup = v2_machine(proc, sys_root, psi(0.0), psi(0.0))
    reader = Reader(T, proc, sys_root, platform="linux")
    assert reader.read().level is Level.NORMAL
    write_file(system, psi(15.0, 1.0))
    assert reader.read() == Reading(Level.WARNING, SYSTEM_LABEL, 15.0, 1.0)
    write_file(cgroup, psi(60.0, 40.0))
    assert reader.read() == Reading(Level.CRITICAL, SERVICE_LABEL, 60.0, 40.0)
    write_file(cgroup, psi(0.0))
    write_file(system, psi(0.0))
    assert reader.read().level is Level.NORMAL


def test_a_source_that_vanishes_is_skipped_and_none_left_is_no_signal(roots):
    proc, sys_root = roots
    system, cgroup = v2_machine(proc, sys_root, psi(12.0), psi(0.0))
    reader = Reader(T, proc, sys_root, platform="linux")
    cgroup.unlink()
    cgroup.parent.rmdir()                                     # the service's cgroup went away
    assert reader.read() == Reading(Level.WARNING, SYSTEM_LABEL, 12.0, 0.0)
    write_file(system, "garbage\n")
    assert reader.read() is None
    system.unlink()
    assert reader.read() is None
    assert reader.available                                   # what was found at the start is still said


@pytest.mark.parametrize("proc_cgroup", [HYBRID_CGROUP, V1_CGROUP], ids=["hybrid", "v1"])
def test_a_v1_or_hybrid_system_reads_the_system_file_only(roots, proc_cgroup):
    proc, sys_root = roots
    write_file(proc / "pressure" / "memory", psi(3.0, 1.0))
    write_file(proc / "self" / "cgroup", proc_cgroup)
    # v1 keeps no pressure files; a v1 memory folder with oomkill's counter in it is not mistaken for one
    v1_folder = sys_root / "memory" / "system.slice" / "x.service"
    write_file(v1_folder / "memory.oom_control", "oom_kill 0\n")
    write_file(v1_folder / "memory.pressure", psi(50.0, 50.0))    # not a v1 file: were it there, it is not read
    reader = Reader(T, proc, sys_root, platform="linux")
    assert reader.sources == [SYSTEM_LABEL]
    assert reader.read() == Reading(Level.NORMAL, SYSTEM_LABEL, 3.0, 1.0)


def test_a_hybrid_system_reads_the_v2_cgroup_at_unified(roots):
    proc, sys_root = roots
    write_file(proc / "pressure" / "memory", psi(0.0))
    write_file(proc / "self" / "cgroup", f"4:memory:/process_api/a073c694\n0::{SERVICE}\n")
    write_file(sys_root / "unified" / SERVICE.lstrip("/") / "memory.pressure", psi(11.0))
    reader = Reader(T, proc, sys_root, platform="linux")
    assert reader.sources == [SYSTEM_LABEL, SERVICE_LABEL]
    assert reader.read() == Reading(Level.WARNING, SERVICE_LABEL, 11.0, 0.0)


def test_one_cgroup_file_at_most_so_a_poll_reads_two_files(roots):
    proc, sys_root = roots
    v2_machine(proc, sys_root, psi(0.0), psi(1.0))
    write_file(sys_root / "unified" / SERVICE.lstrip("/") / "memory.pressure", psi(99.0, 99.0))
    reader = Reader(T, proc, sys_root, platform="linux")
    assert reader.sources == [SYSTEM_LABEL, SERVICE_LABEL]
    assert reader.read() == Reading(Level.NORMAL, SERVICE_LABEL, 1.0, 0.0)    # v2 at the root, the first found


def test_a_container_in_its_own_cgroup_namespace_reads_the_root_cgroup(roots):
    proc, sys_root = roots
    write_file(proc / "pressure" / "memory", psi(0.0))             # the host's, calm
    write_file(proc / "self" / "cgroup", "0::/\n")
    write_file(sys_root / "memory.pressure", psi(30.0, 22.0))      # the container's, at its memory limit
    reader = Reader(T, proc, sys_root, platform="linux")
    assert reader.sources == [SYSTEM_LABEL, "cgroup memory.pressure (/)"]
    assert reader.read().level is Level.CRITICAL


@pytest.mark.parametrize("cgroup_text", ["garbage\n", "some avg10=nan avg60=0 avg300=0 total=0\n"])
def test_a_cgroup_file_that_is_not_psi_at_the_start_is_not_a_source(roots, cgroup_text):
    proc, sys_root = roots
    _, cgroup = v2_machine(proc, sys_root, psi(0.0), cgroup_text)
    reader = Reader(T, proc, sys_root, platform="linux")
    assert reader.sources == [SYSTEM_LABEL]
    write_file(cgroup, psi(90.0, 90.0))                            # found once: a later good file is not read
    assert reader.read().source == SYSTEM_LABEL


def test_no_psi_at_all_is_no_signal(roots):
    proc, sys_root = roots
    write_file(proc / "self" / "cgroup", f"0::{SERVICE}\n")
    reader = Reader(T, proc, sys_root, platform="linux")
    assert not reader.available and reader.sources == [] and reader.read() is None
    assert not Reader(T, roots[0] / "absent", sys_root, platform="linux").available


def test_the_readers_thresholds_decide(roots):
    proc, sys_root = roots
    v2_machine(proc, sys_root, psi(5.0, 2.0), psi(0.0))
    assert Reader(T, proc, sys_root, platform="linux").read().level is Level.NORMAL
    strict = Reader(Thresholds(warning=1.0, critical=2.0), proc, sys_root, platform="linux")
    assert strict.read() == Reading(Level.CRITICAL, SYSTEM_LABEL, 5.0, 2.0)


# ---- macOS, with a fake sysctl -----------------------------------------------------------------------------
class FakeSysctl:
    """kern.memorystatus_vm_pressure_level as the test sets it; counts the calls."""

    def __init__(self, value):
        self.value, self.names = value, []

    def __call__(self, name: str):
        self.names.append(name)
        return self.value


def test_macos_reads_the_kernels_level(roots):
    proc, sys_root = roots
    v2_machine(proc, sys_root, psi(90.0, 90.0), psi(90.0, 90.0))   # present, but not macOS's: not read
    sysctl = FakeSysctl(2)
    reader = Reader(T, proc, sys_root, sysctl=sysctl, platform="darwin")
    assert reader.available and reader.sources == [MACOS_SYSCTL]
    assert reader.read() == Reading(Level.WARNING, MACOS_SYSCTL)
    sysctl.value = 4
    assert reader.read() == Reading(Level.CRITICAL, MACOS_SYSCTL, None, None)
    sysctl.value = None                                       # the sysctl failed this time
    assert reader.read() is None
    sysctl.value = 1
    assert reader.read().level is Level.NORMAL
    assert set(sysctl.names) == {MACOS_SYSCTL}


@pytest.mark.parametrize("value", [None, 0, 7])
def test_macos_without_a_level_is_no_signal(roots, value):
    reader = Reader(T, *roots, sysctl=FakeSysctl(value), platform="darwin")
    assert not reader.available and reader.read() is None


def test_macos_level_with_an_injected_sysctl():
    assert macos_level(FakeSysctl(4)) == Reading(Level.CRITICAL, MACOS_SYSCTL)
    assert macos_level(FakeSysctl(3)) is None


@pytest.mark.skipif(sys.platform == "darwin", reason="off macOS only: there the real sysctl is read")
def test_off_macos_no_sysctl_is_loaded(monkeypatch):
    def load_nothing(name):
        raise AssertionError("macOS's sysctl was called off macOS")
    monkeypatch.setattr(pressure, "darwin_sysctl", load_nothing)
    assert macos_level() is None


# ---- this machine's real files -----------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/pressure/memory").exists(),
                    reason="this system has no /proc/pressure/memory (not Linux, or a kernel without PSI)")
def test_this_machines_real_pressure_file_parses():
    some, full = parse_psi(Path("/proc/pressure/memory").read_text())
    assert math.isfinite(some) and some >= 0 and (full is None or math.isfinite(full))
    reader = Reader(T)
    assert reader.available and reader.sources[0] == SYSTEM_LABEL
    reading = reader.read()
    assert reading is not None and reading.source in reader.sources
    assert reading.some_avg10 is not None and reading.some_avg10 >= 0
    json.dumps(reading.to_json(), allow_nan=False)


@pytest.mark.skipif(sys.platform != "darwin", reason="macOS only: the real kern.memorystatus_vm_pressure_level")
def test_this_macs_real_pressure_level():
    reader = Reader(T)
    assert reader.sources == [MACOS_SYSCTL]
    assert reader.read().level in (Level.NORMAL, Level.WARNING, Level.CRITICAL)


@pytest.mark.skipif(sys.platform == "darwin", reason="off macOS only: there libSystem exists")
def test_off_macos_the_real_sysctl_reader_finds_no_libsystem_and_says_none(roots):
    assert pressure.darwin_sysctl(MACOS_SYSCTL) is None
    assert not Reader(T, *roots, platform="darwin").available
