"""Finding runs: by directory path, by name in the registry of runs started here, or under ./runs.

A bare name (no '/') is a run's name first: a folder of that name in the current directory counts only
when it is a run folder itself, so a data folder that shares a run's name does not hide the run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from trainctl.contract import fsio
from trainctl.contract.lifecycle import State
from trainctl.contract.runfolder import newest_checkpoint

from . import runstate
from .errors import AmbiguousRun, RunNotFound
from .status import is_run_dir


def registry_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "trainctl" / "runs.json"


def known_runs() -> list[Path]:
    """Run directories started on this machine, most recent first (those that still exist), each once.

    Each by its real path: a run folder moved elsewhere and linked back, or recorded under two names, is one
    run (`local_runs` resolves its folders too, so `list` shows it once)."""
    try:
        entries = json.loads(registry_path().read_text())
    except (OSError, ValueError):
        entries = []
    found = (real_path(Path(p)) for p in entries if isinstance(p, str) and is_run_dir(Path(p)))
    return list(dict.fromkeys(found))


def real_path(path: Path) -> Path:
    """`path` with every link resolved (itself where it cannot be: a loop, a permission)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def remember(run_dir: Path) -> None:
    """Put `run_dir` at the head of the registry (so `trainctl status` with no RUN finds it)."""
    run_dir = Path(run_dir).resolve()
    runs = [run_dir] + [p for p in known_runs() if p != run_dir]
    path = registry_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fsio.atomic_write(path, json.dumps([str(p) for p in runs[:200]], indent=1), durable=False)
    except OSError:
        pass   # a read-only home must not stop training; names then resolve under ./runs only


def resolve(run: str | None) -> Path:
    """A run directory from a path, a run name, or (None) the most recent run."""
    if run is None:
        runs = known_runs() + sorted(local_runs(), key=lambda p: -p.stat().st_mtime)
        if not runs:
            raise RunNotFound("no runs found. Start one with: trainctl start --config FILE (or try: trainctl demo)")
        return runs[0]
    path = Path(run).expanduser()
    if is_path(run):
        if is_run_dir(path):
            return path.resolve()
        if path.is_dir():
            raise RunNotFound(f"{path} is a folder but not a trainctl run directory (no config.toml and state). "
                              f"Give a run name or the run's own folder (<runs_dir>/<name>).")
        raise RunNotFound(f"no run folder {path}. See: trainctl list")
    matches = list(dict.fromkeys(p for p in known_runs() + local_runs() if p.name == run))
    if is_run_dir(path) and path.resolve() not in matches:
        matches.append(path.resolve())
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AmbiguousRun(f"run name {run!r} is ambiguous: {' and '.join(str(p) for p in matches)}. "
                           f"Fix: give the run's folder instead of its name.")
    names = sorted({p.name for p in known_runs() + local_runs()})
    hint = f" Known runs: {', '.join(names[:10])}." if names else " No runs are known yet."
    folder = f" (./{run} is a folder, but not a trainctl run)" if path.is_dir() else ""
    raise RunNotFound(f"run {run!r} not found{folder}.{hint} See: trainctl list")


def is_path(run: str) -> bool:
    """'runs/x', './x', '/abs/x', '~/x', '.', '..': a folder, never a name ([run] name has no '/')."""
    return os.sep in run or "/" in run or run.startswith("~") or run in (".", "..")


def never_trained(run_dir: Path) -> bool:
    """A run that failed on a config error before its first checkpoint: not a run people need to see in `list`."""
    saved = runstate.read_state(run_dir)
    return (saved is not None and saved.state is State.FAILED and (saved.reason or "").startswith("config_error")
            and newest_checkpoint(run_dir) is None)


def local_runs() -> list[Path]:
    """Run directories under ./runs (the default runs_dir)."""
    root = Path("runs")
    if not root.is_dir():
        return []
    return [p.resolve() for p in sorted(root.iterdir()) if p.is_dir() and is_run_dir(p)]
