"""Test-only fault injection in the worker, inert unless ``TRAINCTL_FAULTS`` is set (the spec: `contract.faults`).

Points: ``train_step`` (before an optimizer step; step = completed steps), ``micro_batch`` (after each
micro-batch's backward pass: in the middle of a step), ``boot``, and the
checkpoint-write phases ``ckpt_begin``, ``ckpt_bytes`` (mid-write), ``ckpt_written``,
``ckpt_synced`` (fsynced, not renamed), ``ckpt_renamed`` (renamed, directory not fsynced),
``ckpt_committed`` (durable, no marker yet), ``ckpt_marked``, and ``export_written`` (the model folder
complete under its temporary name, not yet renamed).
Actions: sigkill, sigsegv, sigbus, sigabrt, sigusr1 (a checkpoint request), sigkill_parent (a group's rank SIGKILLs
torchrun's agent, its parent), exception, mps_oom, cuda_oom, cpu_oom, hang, spin,
grow_memory (fast, until killed), leak (keeps 40 MB more at every hit), slow (sleeps SLOW_SECONDS: a step that
takes that long), enospc,
nan_loss (at ``train_step``: that step's loss comes out NaN, as a diverging run's does).
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from trainctl.contract.faults import from_env

MPS_OOM_TEXT = ("MPS backend out of memory (MPS allocated: 17.02 GB, other allocations: 1.21 GB, "
                "max allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool. Use "
                "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations "
                "(may cause system failure).")
CUDA_OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity)"
CPU_OOM_TEXT = ("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                "allocate 8589934592 bytes.")

SLOW_SECONDS = 35.0   # longer than the hang timeout's 30 s floor: only a timeout learned from the steps lets it pass
_SIGNALS = {"sigkill": signal.SIGKILL, "sigsegv": signal.SIGSEGV, "sigbus": signal.SIGBUS,
            "sigabrt": signal.SIGABRT}


class Faults:
    """The worker's fault injector: `hit` a point, and the actions due there are carried out."""

    def __init__(self, run_dir: Path, rung_index: int, rank: int = 0):
        self.injector = from_env(run_dir, rung_index, rank)
        self._ballast = []
        self.nan_loss = False   # the training step reads it (train.Trainer._step) and clears it

    def hit(self, point: str, step: int | None = None) -> None:
        for action in self.injector.due(point, step):
            self._do(action)

    def _do(self, action: str) -> None:
        if action != "leak":
            print(f"[trainctl] injecting fault: {action}", flush=True)
        if action in _SIGNALS:
            os.kill(os.getpid(), _SIGNALS[action])
            time.sleep(5)  # a handled SIGABRT/SEGV returns here only if the signal was blocked
        elif action == "sigusr1":   # a checkpoint request arriving at that very moment
            os.kill(os.getpid(), signal.SIGUSR1)
        elif action == "sigkill_parent":
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(5)   # the kernel's word (PR_SET_PDEATHSIG) that the parent is gone comes meanwhile
        elif action == "exception":
            raise RuntimeError("injected fault: a Python exception in the training step")
        elif action == "mps_oom":
            raise RuntimeError(MPS_OOM_TEXT)
        elif action == "cuda_oom":
            raise RuntimeError(CUDA_OOM_TEXT)
        elif action == "cpu_oom":
            raise RuntimeError(CPU_OOM_TEXT)
        elif action == "nan_loss":
            self.nan_loss = True
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif action == "hang":
            while True:
                time.sleep(3600)
        elif action == "slow":
            time.sleep(SLOW_SECONDS)
        elif action == "spin":
            while True:
                pass
        elif action == "leak":
            self._ballast.append(bytearray(os.urandom(1 << 20)) * 40)
        elif action == "grow_memory":
            while True:   # ~200 MB/s of touched memory until something stops us
                self._ballast.append(bytearray(os.urandom(1 << 20)) * 20)
                time.sleep(0.1)
        else:
            raise ValueError(f"unknown fault action {action!r}")
