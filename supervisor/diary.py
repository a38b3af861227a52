"""What the supervisor writes down about a run: the journal, state.json with the lifecycle's transitions,
and the logs' size. None of it may cost the run: a journal or a state.json that cannot be written is
said once, retried and said again when it heals; the run goes on meanwhile.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from trainctl.contract.lifecycle import Event, State, check_transition
from trainctl.contract.records import RunState
from trainctl.contract.runfolder import LOG_DIR, LOGS

from . import logfiles, runstate
from .journal import Journal
from .trouble import Trouble


class Diary:
    """The run's records, as one supervisor keeps them. `facts()` gives state.json's other fields (pids, rung...)."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None], clock: Callable[[], float], log_max_bytes: int,
                 facts: Callable[[], dict]):
        self.run_dir, self.echo, self.log_max_bytes, self.facts = Path(run_dir), echo, log_max_bytes, facts
        self.journal = Journal(self.run_dir, echo, clock)
        self.state_file = Trouble("state.json", echo)
        self.state, self.reason = State.STARTING, None

    def record(self, event: Event, attempt: int | None, rung_index: int | None, step: int | None = None,
               **data) -> None:
        self.journal.record(event, attempt, rung_index, step, **data)

    def enter(self, new: State, reason: str | None, attempt: int, rung_index: int) -> None:
        """A lifecycle transition (checked against the diagram, journaled) or a new reason; state.json made durable."""
        if new is not self.state:
            check_transition(self.state, new)
            self.record(Event.STATE, attempt, rung_index, **{"from": self.state.value, "to": new.value, "reason": reason})
            self.state = new
        self.reason = reason
        self.write(durable=True)

    def write(self, durable: bool) -> None:
        """Replace state.json (atomically; fsynced when `durable`)."""
        try:
            runstate.write_state(self.run_dir, RunState(self.state, self.reason, **self.facts()), durable)
        except OSError as e:
            self.state_file.failed(e, "the run goes on; `trainctl status` may show an older state until it heals")
        else:
            self.state_file.healed()

    def touch(self) -> None:
        """state.json rewritten (status's 'last seen'), the logs kept within their size."""
        self.write(durable=False)
        for name in LOGS:
            try:
                logfiles.rotate_if_needed(self.run_dir / LOG_DIR / name, self.log_max_bytes)
            except OSError as e:
                self.echo(f"could not rotate {name}: {e}")

    def flush(self) -> None:
        self.journal.flush()

    def close(self) -> None:
        self.journal.flush()
        self.journal.close()
