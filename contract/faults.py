"""Test-only fault injection: the spec both processes read, inert unless ``TRAINCTL_FAULTS`` is set.

Spec: comma-separated ``point:action[@step][:once|:rungN|:rankN|:armed]...``, e.g. ``train_step:sigkill@5:once``.
``once`` fires in the first process that reaches it only (a marker file in the run folder remembers
it), so the next attempt recovers; ``rungN`` fires only on rung N of the ladder (1 = first); ``rankN``
only in rank N of a group (nproc_per_node > 1; 0 = the first);
``armed`` fires once each time a bench arms it by creating ``faults-fired/arm-<action>`` (`arm`), so a
fault can come at a chosen moment rather than a chosen step.
The worker's points and actions are in `trainctl.worker.faults`. The supervisor has one point,
``supervisor`` (each look at the worker, step = the step the worker reported; it fires from that
step on, since a look may fall between steps), and one action, ``exception``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .protocol import ENV_FAULTS
from .runfolder import FAULTS_FIRED_DIR


@dataclass(frozen=True)
class Rule:
    point: str
    action: str
    step: int | None      # None: at every hit of the point
    once: bool
    text: str             # the rule as written (names its `once` marker)
    armed: bool = False   # fires only while its arm file exists (and removes it)


def parse(spec: str, rung_index: int | None = None, rank: int = 0) -> list[Rule]:
    """The rules of `spec` that apply on this rung (all of them when `rung_index` is None) and rank."""
    rules = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        point, action, flags = parts[0], parts[1], parts[2:]
        if any(f.startswith("rung") and rung_index is not None and int(f[4:]) != rung_index + 1 for f in flags):
            continue
        if any(f.startswith("rank") and int(f[4:]) != rank for f in flags):
            continue
        step = None
        if "@" in action:
            action, at = action.split("@")
            step = int(at)
        rules.append(Rule(point, action, step, "once" in flags, item, "armed" in flags))
    return rules


class Injector:
    """The rules of this process; `due` answers which actions fire at a point."""

    def __init__(self, rules: list[Rule], run_dir: Path):
        self.rules, self.run_dir = rules, Path(run_dir)

    def due(self, point: str, step: int | None = None, from_step_on: bool = False) -> list[str]:
        """Actions of the rules at `point` that fire now (a `once` rule fires a single time per run)."""
        fired = []
        for rule in self.rules:
            if rule.point != point:
                continue
            if rule.step is not None and (step is None or (step < rule.step if from_step_on else step != rule.step)):
                continue
            if rule.armed:
                try:
                    arm_path(self.run_dir, rule.action).unlink()
                except FileNotFoundError:
                    continue   # not armed now
            if rule.once:
                marker = self.run_dir / FAULTS_FIRED_DIR / rule.text.replace(":", "_").replace("@", "_")
                if marker.exists():
                    continue
                marker.parent.mkdir(exist_ok=True)
                marker.write_text(str(os.getpid()))
            fired.append(rule.action)
        return fired


def arm_path(run_dir: Path, action: str) -> Path:
    """The file that arms the `armed` rules of `action` for one firing."""
    return Path(run_dir) / FAULTS_FIRED_DIR / f"arm-{action}"


def arm(run_dir: Path, action: str) -> None:
    """Arm `action`'s `armed` rules: the next process to reach their point fires once."""
    path = arm_path(run_dir, action)
    path.parent.mkdir(exist_ok=True)
    path.touch()


def from_env(run_dir: Path, rung_index: int | None = None, rank: int = 0) -> Injector:
    """This process's injector: no rules unless TRAINCTL_FAULTS is set."""
    return Injector(parse(os.environ.get(ENV_FAULTS, ""), rung_index, rank), run_dir)
