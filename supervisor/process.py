"""The worker as a child process: spawn in its own session, signal, stop, kill the group, reap."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from trainctl.contract.protocol import ENV_SUPERVISOR_PID, WORKER_ENV, ranks_of
from trainctl.contract.runfolder import LOG_DIR, WORKER_LOG


class WorkerProcess:
    """A running (or finished) worker. Its pid is also its process-group id."""

    def __init__(self, popen: subprocess.Popen, run_dir: Path | None = None):
        self.popen = popen
        self.pid = popen.pid
        self.run_dir = run_dir or Path(popen.args[popen.args.index("--run-dir") + 1])

    @classmethod
    def spawn(cls, run_dir: Path, rung_index: int, attempt: int, describe: str, nproc: int = 1) -> WorkerProcess:
        """Start ``python -m trainctl.worker`` in a new session, its output appended to logs/worker.log; a rung of
        `nproc` > 1 processes: torchrun's agent for them (``trainctl.worker.group``, a GroupProcess)."""
        _log_header(run_dir, f"attempt {attempt}, rung {rung_index + 1} ({describe})")
        args = ["--rung", str(rung_index + 1), "--attempt", str(attempt)]
        if nproc > 1:
            return GroupProcess(_popen(run_dir, [*args, "--nproc", str(nproc)], subprocess.DEVNULL, "trainctl.worker.group"),
                                nproc=nproc)
        return cls(_popen(run_dir, args, subprocess.DEVNULL))

    @classmethod
    def spawn_standby(cls, run_dir: Path) -> WorkerProcess:
        """A worker that imports torch and timm and builds the model now (worker/train.py `prebuild`), then waits on
        its stdin to take over (see `go`): after GO only the rung's device, the checkpoint and the optimizer remain."""
        return cls(_popen(run_dir, ["--standby"], subprocess.PIPE))

    def go(self, rung_index: int, attempt: int, describe: str) -> bool:
        """Make a warm standby the worker of `attempt`; False if it is no longer there."""
        _log_header(self.run_dir, f"attempt {attempt}, rung {rung_index + 1} ({describe}), warm standby {self.pid}")
        try:
            self.popen.stdin.write(f"GO {rung_index + 1} {attempt}\n".encode())
            self.popen.stdin.close()
        except (BrokenPipeError, OSError):
            return False
        return self.popen.poll() is None

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        """Signal the worker process itself (its loader children follow it); SIGCONT goes to its whole group,
        since a SIGSTOP (Ctrl-Z, `kill -STOP -PGID`) may have stopped its loader processes too."""
        if self.popen.poll() is None:
            _send(self.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL everything in the worker's process group (leftover loader processes included)."""
        _kill_group(self.pid)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def release(self) -> None:
        """Let a standby go: EOF on its stdin ends it; kill it if it lingers."""
        with contextlib.suppress(OSError):
            self.popen.stdin.close()
        if self.wait(5) is None:
            self.kill_group()
            self.popen.wait()

    def stop(self, timeout: float) -> int:
        """SIGTERM (checkpoint and exit; SIGCONT, should it be stopped), wait until `timeout`, then SIGKILL the
        group; always reaps."""
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)
        rc = self.wait(timeout)
        if rc is None:
            self.kill_group()
            rc = self.popen.wait()
        self.kill_group()   # no stragglers
        return rc


class GroupProcess(WorkerProcess):
    """A rung's group: torchrun's agent (worker/group.py), whose pid this is, and its K ranks, each in a session
    of its own. Signals go to the ranks (a stop, a checkpoint request, the hang watchdog's SIGABRT for every rank's
    stacks); a kill reaches the agent's group and every rank's."""

    def __init__(self, popen: subprocess.Popen, run_dir: Path | None = None, *, nproc: int):
        super().__init__(popen, run_dir)
        self.nproc = nproc   # ranks to expect (torchrun restarts none: once all are seen, no more scans)
        self.rank_pids: set[int] = set()   # remembered: a rank outlives a SIGKILLed agent by a moment

    def ranks(self) -> list[psutil.Process]:
        self.rank_pids.update(p.pid for p in ranks_of(self.pid))
        alive = []
        for pid in sorted(self.rank_pids):
            with contextlib.suppress(psutil.Error):
                alive.append(psutil.Process(pid))
        return alive

    def poll(self) -> int | None:
        if self.popen.returncode is None and len(self.rank_pids) < self.nproc:   # a scan of the process table
            self.ranks()
        return super().poll()

    def signal(self, sig: int) -> None:
        ranks = self.ranks()
        if not ranks or sig == signal.SIGCONT:   # booting (no rank yet): torchrun's agent takes a stop itself
            super().signal(sig)
        for p in ranks:
            _send(p.pid, sig)

    def kill_group(self) -> None:
        super().kill_group()
        for pid in self.rank_pids:
            _kill_group(pid)


def _send(pid: int, sig: int) -> None:
    """`sig` to process `pid`; SIGCONT to its whole group, since a SIGSTOP (Ctrl-Z, `kill -STOP -PGID`) may have
    stopped its loader processes too."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if sig == signal.SIGCONT:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of group `pgid` (one that is gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _log_header(run_dir: Path, what: str) -> None:
    """A line in worker.log before each attempt's output; best effort (a full disk must not stop the spawn)."""
    log_dir = Path(run_dir) / LOG_DIR
    with contextlib.suppress(OSError):
        log_dir.mkdir(exist_ok=True)
        with open(log_dir / WORKER_LOG, "ab") as log:
            log.write(f"\n=== {what}, {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())


def _popen(run_dir: Path, args: list[str], stdin, module: str = "trainctl.worker") -> subprocess.Popen:
    env = {**os.environ, **WORKER_ENV, ENV_SUPERVISOR_PID: str(os.getpid())}
    (Path(run_dir) / LOG_DIR).mkdir(exist_ok=True)
    with open(Path(run_dir) / LOG_DIR / WORKER_LOG, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module, "--run-dir", str(run_dir), *args],
            stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,   # its own group: one signal reaches DataLoader workers too
            env=env, close_fds=True)


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """Every process whose command line names this run (supervisors, workers, loader processes);
    what tests and the soak check is empty once a run is over."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.info["cmdline"] and str(run_dir) in " ".join(p.info["cmdline"]):
                found.append(p)
        except psutil.Error:
            pass
    return found


def orphans(run_dir: Path) -> list[psutil.Process]:
    """Workers of this run whose parent is not this process: left behind by a supervisor that died."""
    found = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        try:
            if ("trainctl.worker" in cmd and str(run_dir) in cmd and p.pid != os.getpid()
                    and p.info["ppid"] != os.getpid()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def settle(found: list[psutil.Process], grace: float) -> list[tuple[int, bool]]:
    """Give orphaned workers `grace` seconds to checkpoint and exit, then SIGKILL their groups.

    Returns (pid, killed) for each. A worker that is stopped (SIGSTOP) or stuck would otherwise
    hold the run's worker lock forever.
    """
    if not found:
        return []
    _, alive = psutil.wait_procs(found, timeout=grace)
    for p in alive:
        _kill_group(p.pid)
    psutil.wait_procs(alive, timeout=10)
    return [(p.pid, p in alive) for p in found]
