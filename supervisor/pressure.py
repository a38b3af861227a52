"""Is the machine short of memory right now? The operating system's own pressure signal, read without privileges.

Linux: Pressure Stall Information (PSI, kernel 4.20 and later; Documentation/accounting/psi.rst). A pressure
file holds two lines,
    some avg10=0.00 avg60=0.00 avg300=0.00 total=0
    full avg10=0.00 avg60=0.00 avg300=0.00 total=0
`some` is the share of wall time (percent) in which at least one task was stalled waiting for memory
(reclaim, refaults, swap-in), `full` the share in which all non-idle tasks were stalled at once: the CPU
did no work at all for want of memory, which is thrashing. avg10 is the average over the last 10 s.
Two files are read: the machine's `/proc/pressure/memory`, and the `memory.pressure` of the cgroup v2 the
supervisor is in (the worker is its child and stays there), where a cgroup memory limit shows as pressure
long before the machine feels any. The root cgroup's file is read too: on a host it repeats the machine's,
but in a container with its own cgroup namespace it is the container's, while /proc/pressure is the host's.
Cgroup v1 has no pressure files; on a v1 or hybrid system without a v2 cgroup only the machine's file is read.
Without PSI (kernel built without it, or booted with psi=0) there is no signal and the feature is off.

The levels: WARNING when `some avg10` reaches `Thresholds.warning` (10%: a task lost a tenth of the last
ten seconds to memory stalls; the run slows, time to shed load), CRITICAL when `full avg10` reaches
`Thresholds.critical` (20%: everything stood still a fifth of the time). systemd-oomd kills a cgroup whose
memory pressure stays above DefaultMemoryPressureLimit=, 60% by default, for 30 s, so we act well before that
userspace killer; the kernel's OOM killer gives no warning at all, but the stalls that precede it show in PSI.

Why not memory.events' `high` and `max` counters: on a cgroup with a memory.max they tick whenever the
page cache (a data loader reading 100k JPEGs) reaches the limit and is reclaimed, which is normal and
costs nothing; PSI measures the stall time, which is what hurts. (oomkill.py reads memory.events'
`oom_kill` for evidence of a kill, which is another matter.)

macOS: the kernel's own level, `kern.memorystatus_vm_pressure_level` (the levels dispatch's memory-pressure
sources report: 1 normal, 2 warning, 4 critical), readable by any user on macOS (iOS asks for a privilege).

Cheap by design: a poll reads at most two small files, or one sysctl; no subprocess. Every path is a
parameter, so tests feed fixture trees.
"""
from __future__ import annotations

import ctypes
import functools
import math
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from trainctl.contract.runfolder import is_finite_number

from .oomkill import PROC, SYS_CGROUP, cgroup_files

SYSTEM_LABEL = "/proc/pressure/memory"
MACOS_SYSCTL = "kern.memorystatus_vm_pressure_level"
LIBSYSTEM = "/usr/lib/libSystem.B.dylib"      # where macOS's sysctlbyname lives (in the dyld shared cache)

Sysctl = Callable[[str], int | None]     # a sysctl's name -> its integer value, None if it cannot be read


class Level(str, Enum):
    """How short of memory the system is, mildest first."""
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0, 1, 2: compare levels by this, never by their names."""
        return list(Level).index(self)


# the values of kern.memorystatus_vm_pressure_level: DISPATCH_MEMORYPRESSURE_NORMAL, _WARN, _CRITICAL
MACOS_LEVELS = {1: Level.NORMAL, 2: Level.WARNING, 4: Level.CRITICAL}


@dataclass(frozen=True)
class Thresholds:
    """PSI avg10 percentages at which pressure becomes a warning (`some`) and critical (`full`)."""
    warning: float = 10.0
    critical: float = 20.0

    def __post_init__(self):
        for name in ("warning", "critical"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
                raise ValueError(f"memory pressure {name} threshold must be a percentage above 0 and at most 100, "
                                 f"got {value!r}")


@dataclass(frozen=True)
class Reading:
    """One pressure reading: its level, where it came from, and the PSI numbers behind it (Linux only)."""
    level: Level
    source: str              # "/proc/pressure/memory", "cgroup memory.pressure (/system.slice/x.service)", ...
    some_avg10: float | None = None
    full_avg10: float | None = None

    def to_json(self) -> dict:
        """As strict JSON: the level's name, and only finite numbers or null."""
        return {"level": self.level.value, "source": self.source,
                "some_avg10": _finite(self.some_avg10), "full_avg10": _finite(self.full_avg10)}


# ---- pure: parsing and levels -------------------------------------------------------------------------------
def parse_psi(text: str) -> tuple[float, float | None] | None:
    """(some avg10, full avg10) of a PSI file; full is None when the file has no full line; None for garbage."""
    if not isinstance(text, str):
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind not in ("some", "full") or kind in found:
            continue                # a line a later kernel may add is not ours to judge
        value = _avg10(rest)
        if value is None:
            return None             # a some/full line without a sane avg10: this is not a PSI file
        found[kind] = value
    if "some" not in found:
        return None
    return found["some"], found.get("full")


def level_of_psi(some: float, full: float | None, t: Thresholds) -> Level:
    """The level of PSI numbers: critical on `full`, warning on `some`; without a full line, warning at most."""
    if full is not None and full >= t.critical:
        return Level.CRITICAL
    if some >= t.warning:
        return Level.WARNING
    return Level.NORMAL


def level_of_macos(value: int) -> Level | None:
    """The level of kern.memorystatus_vm_pressure_level's value (1, 2, 4); None for any other."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return MACOS_LEVELS.get(value)


def worst(readings: list[Reading]) -> Reading | None:
    """The reading with the worst level (among equals, the most `some` stall, then the first); None if none."""
    if not readings:
        return None
    return max(readings, key=lambda r: (r.level.rank, _finite(r.some_avg10) or 0.0))


# ---- readers ------------------------------------------------------------------------------------------------
def read_psi(path: Path, source: str, t: Thresholds) -> Reading | None:
    """The reading of one PSI file; None if it is absent, unreadable (PSI off for that cgroup) or not PSI."""
    parsed = _read_numbers(path)
    if parsed is None:
        return None
    some, full = parsed
    return Reading(level_of_psi(some, full, t), source, some, full)


def macos_level(sysctl: Sysctl | None = None) -> Reading | None:
    """The macOS kernel's pressure level; None off macOS (unless `sysctl` is given) or if it cannot be read."""
    if sysctl is None:
        if sys.platform != "darwin":
            return None             # never load a libc that is not macOS's
        sysctl = darwin_sysctl
    level = level_of_macos(sysctl(MACOS_SYSCTL))
    return Reading(level, MACOS_SYSCTL) if level is not None else None


def darwin_sysctl(name: str) -> int | None:
    """A 32-bit integer sysctl, read with macOS's sysctlbyname(3); None if it cannot be read."""
    function = _sysctlbyname()
    if function is None:
        return None
    value = ctypes.c_int32(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if function(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0 or size.value != 4:
        return None
    return value.value


def psi_files(proc_root: Path = PROC, sys_root: Path = SYS_CGROUP) -> list[tuple[Path, str]]:
    """The PSI memory files readable now, as (file, label): the machine's, then our own cgroup v2's."""
    found = []
    system = proc_root / "pressure" / "memory"
    if _read_numbers(system) is not None:
        found.append((system, SYSTEM_LABEL))
    try:
        text = (proc_root / "self" / "cgroup").read_text()
    except (OSError, UnicodeDecodeError):
        return found
    # cgroup_files names v2's memory.events (at the root or at unified/ on a hybrid system), v1's oom_control;
    # memory.pressure lies beside memory.events, and v1 has none
    for _, events, cgroup in cgroup_files(text, sys_root):
        if events.name != "memory.events":
            continue
        path, label = events.with_name("memory.pressure"), f"cgroup memory.pressure ({cgroup})"
        if _read_numbers(path) is not None:
            found.append((path, label))
            break
    return found


class Reader:
    """This system's memory-pressure sources, found once per supervisor; `read()` gives the worst of them now."""

    def __init__(self, thresholds: Thresholds, proc_root: Path = PROC, sys_root: Path = SYS_CGROUP,
                 sysctl: Sysctl | None = None, platform: str = sys.platform):
        self.thresholds = thresholds
        self._files: list[tuple[Path, str]] = []
        self._sysctl: Sysctl | None = None
        if platform == "darwin":
            sysctl = sysctl or darwin_sysctl
            if macos_level(sysctl) is not None:
                self._sysctl = sysctl
        else:
            self._files = psi_files(proc_root, sys_root)
        self.sources: list[str] = [label for _, label in self._files] + ([MACOS_SYSCTL] if self._sysctl else [])

    @property
    def available(self) -> bool:
        """Whether this system gave any pressure signal when the reader was built."""
        return bool(self.sources)

    def read(self) -> Reading | None:
        """The worst reading of the sources now; a source gone since is skipped. None: no signal now."""
        readings = [read_psi(path, label, self.thresholds) for path, label in self._files]
        if self._sysctl is not None:
            readings.append(macos_level(self._sysctl))
        return worst([r for r in readings if r is not None])


def _read_numbers(path: Path) -> tuple[float, float | None] | None:
    """parse_psi of a file; None if it cannot be read."""
    try:
        return parse_psi(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None


def _avg10(fields: str) -> float | None:
    """The avg10 of a PSI line's `avg10=.. avg60=.. avg300=.. total=..`, if it is a finite, non-negative number."""
    for field in fields.split():
        key, _, value = field.partition("=")
        if key == "avg10":
            try:
                number = float(value)
            except ValueError:
                return None
            return number if math.isfinite(number) and number >= 0 else None
    return None


def _finite(value) -> float | None:
    """A number JSON can carry: finite floats pass, anything else is None."""
    return float(value) if is_finite_number(value) else None


@functools.cache
def _sysctlbyname():
    """macOS's sysctlbyname, loaded once; None where it cannot be loaded."""
    try:
        function = ctypes.CDLL(LIBSYSTEM, use_errno=True).sysctlbyname
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                         ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function
