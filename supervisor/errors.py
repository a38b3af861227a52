"""The errors of trainctl's commands, the same for the CLI and the Python API (`trainctl.ConfigError`, ...).

Each is a person's mistake or a refusal, never a bug of ours: `str(e)` is one line saying what is wrong and
what to do, `exit_code` is what the CLI exits with (`trainctl.contract.protocol.ExitCode`) and `label` how
it begins that line on stderr ("error: ...", "refused: ..."). Standard library and the contract only:
`import trainctl` may load this module without loading anything heavy.
"""
from __future__ import annotations

from trainctl.contract import config_rules
from trainctl.contract.protocol import ExitCode


class Error(Exception):
    """A trainctl command that could not be carried out (the base of every error below)."""
    exit_code: int = ExitCode.FAILED
    label = "error"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(Error, config_rules.ConfigError):
    """Bad config or data: the message names the key (or the file) and the fix."""
    exit_code = ExitCode.BAD_CONFIG


class RunNotFound(Error, LookupError):
    """No run by that name or folder."""
    exit_code = ExitCode.NOT_FOUND


class AmbiguousRun(Error, LookupError):
    """A name shared by runs in different folders: the person must give the folder."""
    exit_code = ExitCode.USAGE


class Refused(Error):
    """The run's state does not allow it; args = (message, exit code), REFUSED unless another is given."""
    label = "refused"

    def __init__(self, message: str, exit_code: int = ExitCode.REFUSED):
        super().__init__(message, exit_code)
        self.exit_code = exit_code


class AlreadyRunning(Refused):
    """Another supervisor holds the run (or another start of it is under way)."""

    def __init__(self, message: str):
        super().__init__(message, ExitCode.RUNNING)


class NotRunning(Refused):
    """Nothing to stop: no supervisor runs the run."""

    def __init__(self, message: str):
        super().__init__(message, ExitCode.REFUSED)


class RunFailed(Error):
    """The run failed as it started (its worker could not train), with the supervisor's reason."""
    exit_code = ExitCode.FAILED


class Timeout(Error, TimeoutError):
    """Waiting for a run took longer than the time given; the run itself goes on."""
    exit_code = ExitCode.TIMEOUT
    label = "timeout"


class NoSpace(Error):
    """A full disk (or a quota): the command wrote nothing it could not finish; the checkpoints are untouched."""
    exit_code = ExitCode.REFUSED
