"""Signal flags and the orphan watch. Handlers only set flags; the training loop acts on them."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from trainctl.contract.protocol import ORPHAN_GRACE_SECONDS

PR_SET_PDEATHSIG = 1


class Flags:
    """What the outside world has asked for, read by the loop between optimizer steps."""

    def __init__(self):
        self.stop = False
        self.stop_reason = ""
        # SIGUSR1s received. A count, not a flag the loop clears: a request that arrives while a snapshot
        # is being taken must not be wiped out by that snapshot (`Checkpointing` answers them by count).
        self.checkpoint_requests = 0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_term(self, signum, _frame) -> None:
        self.stop, self.stop_reason = True, signal.Signals(signum).name

    def _on_usr1(self, _signum, _frame) -> None:
        self.checkpoint_requests += 1

    def orphaned(self, *_args) -> None:
        """The supervisor is gone: checkpoint and stop; if that stalls, SIGALRM ends the process."""
        if not self.stop:
            self.stop, self.stop_reason = True, "supervisor gone"
            signal.alarm(int(ORPHAN_GRACE_SECONDS))


def watch_parent(expected_parent: int, flags: Flags) -> None:
    """When the supervisor dies (even by SIGKILL), checkpoint and stop; hard-exit if that stalls.

    Linux: the kernel sends SIGUSR2 when the parent dies (PR_SET_PDEATHSIG) — no extra thread,
    so nothing races faulthandler when it dumps every thread's stack. Elsewhere (macOS) a thread
    polls the parent pid.
    """
    if sys.platform.startswith("linux"):
        signal.signal(signal.SIGUSR2, flags.orphaned)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR2, 0, 0, 0) == 0:
            if os.getppid() != expected_parent:   # it died before the prctl took effect
                flags.orphaned()
            return

    def poll():
        while os.getppid() == expected_parent:
            time.sleep(0.5)
        flags.orphaned()

    threading.Thread(target=poll, name="trainctl-orphan-watch", daemon=True).start()
