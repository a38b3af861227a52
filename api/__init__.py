"""trainctl from Python: start a supervised run, watch it, and attach to it again from any process.

    import trainctl
    run = trainctl.start("eva02.toml")                  # or a dict with the TOML's sections; detached, like the CLI
    run = trainctl.start(config_dict, name="eva02-try2")
    run.watch()                                         # the live panel, in a terminal or in Jupyter
    run = trainctl.Run("eva02-try2")                    # after a kernel restart: attach by name or folder
    run.status(); run.wait(); run.stop(); run.resume(); run.metrics()
    trainctl.runs()                                     # what `trainctl list --json` shows

The training runs in its own supervisor process, not in this one: this process (a notebook's kernel) can
end at any moment and the run goes on. The operations are the CLI's own (`trainctl.supervisor.control`),
and so are the errors: `trainctl.Error` and its kinds (`ConfigError`, `RunNotFound`, `AlreadyRunning`, ...),
each with the CLI's one-line message and exit code.

Importing trainctl loads nothing: every process of ours imports this file first (the worker too, which must
never load the supervisor), so the API's modules load on first use (PEP 562), and torch never.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_FROM = {
    "trainctl.run": ("Run", "start", "runs"),
    "trainctl.supervisor.errors": ("Error", "ConfigError", "RunNotFound", "AmbiguousRun", "Refused", "AlreadyRunning",
                                   "NotRunning", "RunFailed", "Timeout", "NoSpace"),
}
_MODULE = {name: module for module, names in _FROM.items() for name in names}
__all__ = list(_MODULE)

if TYPE_CHECKING:   # what editors and type checkers see; at runtime, `__getattr__` loads them when asked
    from trainctl.run import Run, runs, start  # noqa: F401
    from trainctl.supervisor.errors import (AlreadyRunning, AmbiguousRun, ConfigError, Error, NoSpace,  # noqa: F401
                                            NotRunning, Refused, RunFailed, RunNotFound, Timeout)


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import version
        return version("trainctl")
    if name not in _MODULE:
        raise AttributeError(f"module 'trainctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE[name]), name)
    globals()[name] = value   # loaded once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
