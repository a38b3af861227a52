"""Run names a person can type, a run folder that can be made, and runs written into hints as shell words.

A new run's name is checked at `start` (and `service install --config`): a name like `-rf` reads as an
option, one with a newline or `$(...)` cannot be pasted back safely. Runs already on disk keep whatever
name an older version allowed: `status`, `stop` and `resume` still find them, and hints name them by
their folder, quoted. Standard library only.
"""
from __future__ import annotations

import os
import re
import shlex
import stat
from pathlib import Path

from .config_rules import ConfigError

NAME_MAX = 100
NAME_RULE = (f"use at most {NAME_MAX} letters, digits, '.', '_' or '-', starting with a letter or a digit "
             f"(e.g. \"vit-tiny.lr5e-4\")")
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_plain_name(name: str) -> bool:
    """A name that is one shell word as it is, is no option, and makes a portable folder name."""
    return len(name) <= NAME_MAX and _PLAIN.fullmatch(name) is not None


def name_problem(name: str) -> str | None:
    """Why `name` is not a plain run name ('starts with '-'', 'contains '\\n''), or None when it is."""
    if is_plain_name(name):
        return None
    if not name:
        return "is empty"
    if len(name) > NAME_MAX:
        return f"is {len(name)} characters long"
    if not name[0].isascii() or not name[0].isalnum():
        return f"starts with {name[0]!r}"
    bad = next(ch for ch in name if not _PLAIN.fullmatch("a" + ch))
    return f"contains {bad!r}"


def check_new_run(cfg) -> None:
    """A new run's name and the place of its folder, before anything is written: else one ConfigError."""
    where = cfg.source.name if cfg.source else "config"
    problem = name_problem(cfg.run.name)
    if problem:
        raise ConfigError(f"{where}: [run] name = {_shown(cfg.run.name)} {problem}, so it is not a usable run "
                          f"name. Fix: {NAME_RULE}.")
    problem = folder_problem(cfg.run_dir)
    if problem:
        raise ConfigError(f"{where}: [run] runs_dir = {_shown(str(cfg.run.runs_dir))}: {problem}. Fix: set "
                          f"[run] runs_dir to a folder you can write to.")


def folder_problem(run_dir: Path) -> str | None:
    """Why the folder `run_dir` cannot be made or written (a file in the way, no write permission), or None."""
    path = Path(os.path.abspath(run_dir))
    try:
        while True:   # the nearest part of the path that exists: the run folder, runs_dir, or a folder above
            try:
                mode = os.stat(path).st_mode
                break
            except (FileNotFoundError, NotADirectoryError):
                path = path.parent   # '/' exists: this ends
    except OSError as e:   # too long a name, a symlink loop, a folder we may not look into
        return f"cannot be used ({e.strerror or e})"
    if not stat.S_ISDIR(mode):
        return f"{path} is a file, not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable (read-only, or not yours)"
    return None


def shell_run(run_dir) -> str:
    """The run as one word of a command a person may paste (`trainctl status WORD`): its name when plain, else
    its folder, quoted, so that a name like `-rf`, `a b` or `$(...)` is never read as an option or run."""
    run_dir = Path(run_dir)
    return run_dir.name if is_plain_name(run_dir.name) else shell_path(run_dir)


def shell_path(path) -> str:
    """A path as one shell word: absolute (never read as an option) and quoted."""
    return shlex.quote(os.path.abspath(path))


def _shown(text: str, most: int = 60) -> str:
    """repr(text), cut short when long: a 300-character name is named, not printed whole."""
    return repr(text) if len(text) <= most else f"{text[:most - 20]!r}... ({len(text)} characters)"
