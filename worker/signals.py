"""Signal flags and the orphan watch. Handlers only set flags; the training loop acts on them."""
from __future__ import annotations

import os
import signal
import threading
import time

from .protocol import EXIT_STOPPED, ORPHAN_GRACE_SECONDS


class Flags:
    """What the outside world has asked for, read by the loop between optimizer steps."""

    def __init__(self):
        self.stop = False
        self.checkpoint = False
        self.stop_reason = ""

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_term(self, signum, _frame) -> None:
        self.stop, self.stop_reason = True, signal.Signals(signum).name

    def _on_usr1(self, _signum, _frame) -> None:
        self.checkpoint = True


def watch_parent(expected_parent: int, flags: Flags, poll: float = 0.5) -> None:
    """When the supervisor dies (even by SIGKILL), checkpoint and stop; hard-exit if that stalls.

    Polling the parent pid works on Linux and macOS alike; the re-parented worker sees a new ppid.
    """
    def run():
        while os.getppid() == expected_parent:
            time.sleep(poll)
        flags.stop, flags.stop_reason = True, "supervisor gone"
        print(f"[trainctl] supervisor {expected_parent} is gone: checkpointing and stopping", flush=True)
        time.sleep(ORPHAN_GRACE_SECONDS)
        print("[trainctl] still running after the orphan grace period: exiting now", flush=True)
        os._exit(EXIT_STOPPED)

    threading.Thread(target=run, name="trainctl-orphan-watch", daemon=True).start()
