"""`trainctl.start`, `trainctl.Run` and `trainctl.runs`: the CLI's operations from Python.

What each does is `trainctl.supervisor.control`'s, the same code the CLI runs; this module only turns a dict
into a config file and results into the dicts `trainctl status --json` and `trainctl list --json` print. A
`Run` holds nothing but its folder, so any process can attach to a run at any time (a notebook's kernel
after a restart too), and the run never depends on the process that started it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import tomllib
import warnings
from collections.abc import Mapping
from pathlib import Path

from trainctl.contract.config import from_dict, load, to_toml
from trainctl.contract.names import check_new_run
from trainctl.supervisor import control
from trainctl.supervisor.runs import resolve
from trainctl.contract.runfolder import read_metrics
from trainctl.supervisor.status import gather


def start(config: str | os.PathLike | Mapping, name: str | None = None, foreground: bool = False,
          rung: int | None = None) -> Run:
    """Start a new run, as `trainctl start --config` does: everything that can be checked is checked first (a
    refused start writes nothing), then the run folder is made with a frozen copy of the config.

    `config` is the path of a TOML config, or a dict with the same sections ({"run": {...}, "model": {...},
    "data": {...}, "train": {...}, "profiles": [{...}], ...}); relative paths in a dict are relative to the
    current folder. `name` replaces [run] name. Detached (the default), it returns once the worker trains, and
    the run goes on whatever happens to this process; `foreground=True` supervises it here and returns when the
    run has ended. `rung` (from 1) starts there, as `trainctl start --rung` does; None: the first, or lower where
    this machine's rung memory says so. Raises trainctl.ConfigError, trainctl.AlreadyRunning, trainctl.Refused, ...
    (trainctl.Error).
    """
    with control.translated(), quiet_widgets(), config_file(config, name) as path:
        run_dir, _ = control.start(path, foreground, rung)
    return Run(run_dir)


def runs(all: bool = False) -> list[dict]:
    """What `trainctl list --json` shows: the status of every run started here (and under ./runs), most recent
    first. Runs that never trained (they failed on a config error) only with all=True."""
    return [st.to_json() for st in control.runs(all)[0]]


class Run:
    """A run, by name or folder: `trainctl.Run("eva02-birds")`, `trainctl.Run("runs/eva02-birds")`.

    Raises trainctl.RunNotFound (or AmbiguousRun: a name shared by two folders; give the folder).
    """

    def __init__(self, name_or_folder: str | os.PathLike):
        self.folder: Path = resolve(os.fspath(name_or_folder))
        self.name: str = self.folder.name

    def __repr__(self) -> str:
        return f"trainctl.Run({self.name!r}, folder={str(self.folder)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Run) and other.folder == self.folder

    def __hash__(self) -> int:
        return hash(self.folder)

    def status(self) -> dict:
        """What `trainctl status --json` says: state, step, rung, crashes, last checkpoint, ... (supervisor alive or not)."""
        return gather(self.folder).to_json()

    def wait(self, timeout: float | None = None, interval: float = 1.0) -> dict:
        """The final status, once the run has succeeded, failed or stopped. trainctl.Timeout after `timeout`
        seconds (None: no limit); the run goes on either way."""
        return control.wait(self.folder, timeout, interval).to_json()

    def stop(self, timeout: float | None = None) -> dict:
        """Stop as `trainctl stop` does (the worker finishes its step and checkpoints); the status once stopped.
        trainctl.NotRunning when nothing runs it; trainctl.Timeout when it is still stopping after `timeout` s."""
        with quiet_widgets():
            return control.stop(self.folder, timeout).to_json()

    def resume(self, rung: int | None = None, config: str | os.PathLike | None = None, foreground: bool = False,
               from_scratch: bool = False, *, profile: int | None = None) -> Run:
        """Continue from the newest checkpoint with a fresh restart budget, as `trainctl resume` does: on `rung`
        (1 = the ladder's first; `profile` is its older name), with an edited `config` file (checked against the
        checkpoints first), or `from_scratch` (every checkpoint set aside, nothing deleted). Returns this run."""
        with quiet_widgets():
            control.resume(self.folder, rung if rung is not None else profile, config, foreground, from_scratch)
        return self

    def metrics(self, kind: str | None = None) -> list[dict]:
        """The lines of metrics.jsonl as dicts, oldest first ("train" every log_every_steps, "val" every epoch;
        `kind` keeps one of them). Steps re-done after a crash appear again, marked by their "attempt".
        For a table: pandas.DataFrame(run.metrics("train"))."""
        records = read_metrics(self.folder)
        return records if kind is None else [r for r in records if r.get("kind") == kind]

    def watch(self, interval: float = 2.0) -> dict:
        """The live status panel (a terminal's, or in place in a Jupyter cell) until the run's supervisor exits,
        or until interrupted (Ctrl-C, the notebook's stop button: the run goes on). The status then."""
        try:
            return control.watch(self.folder, interval).to_json()
        except KeyboardInterrupt:
            return self.status()

    def logs(self, supervisor: bool = False) -> str:
        """The worker's console output (every attempt), or the detached supervisor's, as `trainctl logs` prints it."""
        with control.translated():
            return control.log_file(self.folder, supervisor).read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def config_file(config, name: str | None):
    """The path of a TOML config for `config` with [run] name `name`: the file itself when nothing changes, else a
    temporary file of every value (paths absolute); the run folder's frozen copy outlives it."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string, not {type(name).__name__}")
    if isinstance(config, (str, os.PathLike)) and name is None:
        yield Path(config)
        return
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        raw, base, source = read_toml(path), path.resolve().parent, path.resolve()
    elif isinstance(config, Mapping):
        raw, base, source = plain(config), Path.cwd(), None
    else:
        raise TypeError(f"config must be the path of a TOML file or a dict of its sections, not {type(config).__name__}")
    if name is not None and isinstance(raw.get("run", {}), Mapping):
        raw = {**raw, "run": {**raw.get("run", {}), "name": name}}
    cfg = from_dict(raw, base_dir=base, source=source)
    check_new_run(cfg)   # said of the name given here, before a temporary file's name could appear in it
    with tempfile.TemporaryDirectory(prefix="trainctl-") as folder:
        path = Path(folder) / f"{cfg.run.name}.toml"
        path.write_text(to_toml(cfg), encoding="utf-8")
        yield path


def read_toml(path: Path) -> dict:
    """The TOML file's tables; a missing, unreadable or unparsable file is the CLI's one-line ConfigError."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        load(path)   # raises it, worded as for `trainctl start --config`
        raise


def plain(value):
    """A config dict as TOML holds it: paths as strings, tuples as lists, mappings as dicts."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


@contextlib.contextmanager
def quiet_widgets():
    """In Jupyter, rich's spinners ask for ipywidgets (a warning per command); without it they are only not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message='install "ipywidgets"')
        yield
