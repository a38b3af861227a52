"""A rung of K data-parallel processes: ``python -m trainctl.worker.group --run-dir D --rung N --attempt A --nproc K``.

torchrun's own engine (`torch.distributed.run` and its elastic agent) starts the K ranks of ``python -m
trainctl.worker``: ``--standalone`` (its rendezvous on a free local port, a new one for every attempt, so a rerun
never meets a stale one), ``--max-restarts 0`` (trainctl's policy, not torchrun's, decides every restart). This
process is that agent, and to the supervisor it is the worker of the attempt:
- the ranks see it as their parent (TRAINCTL_SUPERVISOR_PID names it): if it dies, even by SIGKILL, each rank is
  told by the kernel and stops at a checkpoint; if the supervisor dies, it tells the ranks the same;
- when the group ends, the agent's failure report (torchrun's ChildFailedError: each failed rank's exit code and
  pid) and the ranks' own error JSONs decide which rank failed first — a rank whose error only says that a peer
  went away (a broken collective) is evidence, not the cause. This process then ends as that rank ended (its
  exit code, or its signal), with that rank's error JSON and every rank's stack dumps at the attempt's usual
  evidence paths: the supervisor classifies a group's attempt as it classifies one worker's. ``attempt-N.group.json``
  keeps how every rank ended.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from pathlib import Path

import psutil

from trainctl.contract import fsio
from trainctl.contract.protocol import ENV_SUPERVISOR_PID, ExitCode, ranks_of
from trainctl.contract.runfolder import error_json_path, fault_log_path, group_record_path, read_json

PR_SET_PDEATHSIG = 1
MONITOR_SECONDS = 0.1   # how often the agent looks at its ranks: the first failure is seen before its echoes


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m trainctl.worker.group",
                                     description="a rung's group of K worker processes under torchrun (started by the "
                                                 "supervisor)")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--rung", type=int, required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--nproc", type=int, required=True)
    return parser.parse_args(argv)


def torchrun_args(args) -> list[str]:
    return ["--standalone", "--nproc-per-node", str(args.nproc), "--max-restarts", "0",
            "--monitor-interval", str(MONITOR_SECONDS),
            "-m", "trainctl.worker", "--run-dir", str(args.run_dir), "--rung", str(args.rung),
            "--attempt", str(args.attempt)]


def _tell_ranks_supervisor_gone(*_args) -> None:
    """SIGUSR2 is what a worker takes for "the supervisor is gone" (worker/signals.py): checkpoint and stop."""
    for p in ranks_of(os.getpid()):
        try:
            p.send_signal(signal.SIGUSR2)
        except psutil.Error:
            pass


def watch_supervisor() -> bool:
    """Pass the supervisor's death on to the ranks (Linux: the kernel signals it; elsewhere the ranks' own watch
    of this process ends with it). False when the supervisor is already gone."""
    supervisor = int(os.environ.get(ENV_SUPERVISOR_PID, "0"))
    if sys.platform.startswith("linux"):
        signal.signal(signal.SIGUSR2, _tell_ranks_supervisor_gone)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGUSR2, 0, 0, 0)
    return not supervisor or os.getppid() == supervisor


def main(argv=None) -> int:
    args = parse_args(argv)
    if not watch_supervisor():
        return ExitCode.STOPPED
    os.environ[ENV_SUPERVISOR_PID] = str(os.getpid())   # the ranks' parent: they watch this process
    # K processes share the cores (the trainer sets torch's threads the same way, unless [train] threads says)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        torchrun.run(torchrun.parse_args(torchrun_args(args)))
    except ChildFailedError as e:
        ends = {rank: (f.exitcode, f.pid, f.timestamp) for rank, f in e.failures.items()}
        return end_like(args.run_dir, args.attempt, args.nproc, ends)
    except SignalException as e:   # a stop sent to torchrun's agent itself (the ranks not up yet, or by hand):
        # torchrun passed it on to the ranks (a running rank stops at a checkpoint), then ended
        print(f"[trainctl] group of {args.nproc}: {e.sigval.name} to torchrun's agent; stopped", file=sys.stderr,
              flush=True)
        return ExitCode.STOPPED
    return ExitCode.OK


def first_failure(ends: dict[int, tuple[int, int, float]], errors: dict[int, dict | None]) -> int:
    """The rank whose failure caused the others: not one whose error says a peer went away (a broken collective);
    among the rest, the first torchrun saw."""
    causes = [r for r in ends if not (errors.get(r) or {}).get("collective")] or list(ends)
    return min(causes, key=lambda r: (ends[r][2], r))


def end_like(run_dir: Path, attempt: int, nproc: int, ends: dict[int, tuple[int, int, float]]) -> int:
    """Record how the group ended, put the first failure's evidence where the supervisor reads an attempt's, and
    end this process the way that rank ended."""
    errors = {r: read_json(error_json_path(run_dir, attempt, r)) for r in range(nproc)}
    first = first_failure(ends, errors)
    code = ends[first][0]
    record = {"nproc": nproc, "first_failure": first,
              "ranks": [{"rank": r, "pid": ends[r][1] if r in ends else None,
                         "exit_code": ends[r][0] if r in ends else None,
                         **({"error": errors[r].get("kind"), "message": str(errors[r].get("message"))[:300],
                             "collective": bool(errors[r].get("collective"))} if errors.get(r) else {})}
                        for r in range(nproc)]}
    try:
        fsio.atomic_write_json(group_record_path(run_dir, attempt), record)
        if errors.get(first):
            fsio.atomic_write_json(error_json_path(run_dir, attempt), errors[first])
        gather_fault_logs(run_dir, attempt, nproc, first)
    except OSError as e:   # a full disk: the exit below still says how it ended
        print(f"[trainctl] could not write the group's evidence: {e}", file=sys.stderr, flush=True)
    print(f"[trainctl] group of {nproc}: rank {first} failed first (exit {code})", file=sys.stderr, flush=True)
    if code < 0:   # died of a signal: so does this process, for the supervisor to classify
        if -code not in (signal.SIGKILL, signal.SIGSTOP):   # those two cannot be caught, nor their handler set
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def gather_fault_logs(run_dir: Path, attempt: int, nproc: int, first: int) -> None:
    """Every rank's stack dumps (a native crash, the hang watchdog's SIGABRT) in the attempt's fault log, the first
    failure's first."""
    parts = []
    for r in [first] + [r for r in range(nproc) if r != first]:
        path = fault_log_path(run_dir, attempt, r)
        if path.exists() and path.stat().st_size:
            parts.append(f"=== rank {r} ({path.name}) ===\n" + path.read_text(errors="replace"))
    if parts:
        fault_log_path(run_dir, attempt).write_text("\n".join(parts))


if __name__ == "__main__":
    sys.exit(main())
