"""Asynchronous checkpoints: the training thread captures the state; one background thread serialises,
writes, fsyncs and commits it (the commit rules of `checkpoint.save`, unchanged).

On the CPU the capture shares the live parameters and optimizer state instead of copying them (no
state-sized copy of memory, no copy time): the writer reads them while training runs its next forward
and backward passes, and `wait_released` holds the next optimizer step until torch.save has read them
all. On another device the capture is already a private CPU copy and nothing waits.

Never two writes at once: a new snapshot waits for the write in flight. The training loop keeps the
promise "no crash loses more than `every_steps` optimizer steps" by never starting a step while the
newest *committed* checkpoint is `every_steps` behind (see `checkpointing.Checkpointing`).

The writer thread runs at training's CPU priority. A lower one (nice +10 on its thread, Linux) was
measured on a 2-core machine and left out: the write committed 2–4x later (2.3 s instead of 0.95 s for
0.96 GiB; it mostly waits for the disk, and at a low priority also for a core after each wait) and the
step beside it was no faster (bench/checkpoint.py). What the write costs training is its CPU time, which
`ckptfile.ChecksumWriter` keeps near one pass over the state's bytes.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from trainctl.contract.runfolder import Committed

from . import checkpoint


class Writer:
    def __init__(self, folder: Path, keep_last: int, on_phase: Callable[[str, int], None], background: bool = True,
                 verified: checkpoint.Verified | None = None):
        self.folder, self.keep_last, self.on_phase, self.background = Path(folder), keep_last, on_phase, background
        self.verified = verified if verified is not None else checkpoint.Verified()   # what prune may trust
        self._thread: threading.Thread | None = None
        self._done: Committed | None = None
        self._error: BaseException | None = None
        self.in_flight: int | None = None       # step of the snapshot being written
        self.write_seconds = 0.0                 # duration of the last completed write
        self._released = threading.Event()      # the writer no longer reads the live training state
        self._released.set()

    def submit(self, step: int, state: dict, info: dict, shares_training_memory: bool = False) -> None:
        """Write `state` as the checkpoint of `step`; waits for the previous write. With
        `shares_training_memory`, `state` points into tensors that training must not change until
        `wait_released` returns."""
        self.wait()
        self.in_flight = step
        if not self.background:
            self._write(step, state, info)
            return
        if shares_training_memory:
            self._released.clear()
        self._thread = threading.Thread(target=self._write, args=(step, state, info), name="trainctl-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _write(self, step: int, state: dict, info: dict) -> None:
        started = time.monotonic()

        def phase(name: str) -> None:
            if name == "written":   # torch.save has returned: every tensor has been read
                self._released.set()
            self.on_phase(name, step)
        try:
            self._done = checkpoint.save(self.folder, step, state, self.keep_last, info, on_phase=phase,
                                         verified=self.verified)
        except BaseException as e:   # handed to the training thread, which decides what it means
            self._error = e
        finally:
            self._released.set()
        self.write_seconds = time.monotonic() - started

    def wait_released(self) -> None:
        """Block until the write in flight no longer reads the live training state."""
        self._released.wait()

    def poll(self) -> Committed | None:
        """The checkpoint committed since the last call, if any (raises the write's error, if it failed)."""
        if self._thread is not None and self._thread.is_alive():
            return None
        return self._collect()

    def wait(self) -> Committed | None:
        """Block until the write in flight is committed (or failed)."""
        if self._thread is not None:
            self._thread.join()
        return self._collect()

    def _collect(self) -> Committed | None:
        self._thread = None
        if self._error is not None:
            error, self._error, self.in_flight = self._error, None, None
            raise error
        done, self._done = self._done, None
        if done is not None:
            self.in_flight = None
        return done

    def drain(self) -> None:
        """Before the process exits on an error: let the write in flight finish (a daemon thread
        still inside torch.save when the interpreter shuts down can crash the process)."""
        if self._thread is not None:
            self._thread.join()

    @property
    def busy(self) -> bool:
        return self.in_flight is not None
