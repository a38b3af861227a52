"""Goodput under faults: a tiny model trains under a supervisor while its worker is SIGKILLed every F seconds.

Goodput = (supervised time − re-done work − restarts − checkpoint blocking) / supervised time,
computed from the run's journal by the same code that writes the morning report.

    python bench/goodput.py --every 60 --minutes 5
    python bench/goodput.py --every 300 --minutes 15
    python bench/goodput.py --catchable --every 60 --minutes 5 --interval 30 --per-class 1000

--catchable: instead of SIGKILLs, failures the worker can catch (a Python exception, then an out-of-memory
error, alternating, at the next optimizer step after each arming), run twice in one go: without the
checkpoint at failure ([checkpoint] at_failure = false: what trainctl did before issue 20) and with it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, start_supervisor, tiny_run  # noqa: E402

from trainctl.contract import faults
from trainctl.contract.protocol import ENV_FAULTS, Phase, read_heartbeat
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.report import summarize


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=float, default=60, help="seconds between SIGKILLs")
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--interval", type=float, default=2.0, help="[checkpoint] every_seconds")
    p.add_argument("--cold", action="store_true", help="without the warm standby")
    p.add_argument("--per-class", type=int, default=24, help="training images per class (4 classes; an epoch "
                   "ends in a checkpoint, so a short epoch hides the interval)")
    p.add_argument("--catchable", action="store_true",
                   help="exceptions and out-of-memory errors instead of SIGKILLs, without and with the checkpoint "
                        "at failure")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="trainctl-goodput-"))
    if not args.catchable:
        s = trial(root, "goodput", args, {"warm_standby": not args.cold}, {}, kill)
        report(s, f"a SIGKILL every {args.every:g} s", args, "targets: >= 90% at 60 s, >= 97% at 300 s")
        return s
    results = {}
    for at_failure in (False, True):
        s = trial(root, f"catchable-{at_failure}", args, {"warm_standby": not args.cold}, {"at_failure": at_failure},
                  throw, {ENV_FAULTS: "train_step:exception:armed,train_step:cpu_oom:armed"})
        report(s, f"a caught exception or OOM error every {args.every:g} s, at_failure = {str(at_failure).lower()}",
               args, "issue 20: catchable faults lose at most the step they came in")
        results[at_failure] = s
    print(f"goodput under catchable faults: {results[False]['goodput']:.1%} without the checkpoint at failure, "
          f"{results[True]['goodput']:.1%} with it; re-done work {results[False]['redone_seconds']:.1f} s -> "
          f"{results[True]['redone_seconds']:.1f} s")
    return results


def kill(run_dir: Path, n: int) -> bool:
    """SIGKILL the training worker; False when none is training."""
    hb = read_heartbeat(run_dir)
    if not (hb and hb.pid and hb.phase == Phase.TRAINING):
        return False
    os.kill(hb.pid, signal.SIGKILL)
    return True


def throw(run_dir: Path, n: int) -> bool:
    """Arm the next catchable failure: an exception, then an out-of-memory error, alternating."""
    faults.arm(run_dir, ("exception", "cpu_oom")[n % 2])
    return True


def trial(root: Path, name: str, args, supervisor: dict, checkpoint: dict, fault, env: dict | None = None) -> dict:
    """One supervised run of `args.minutes`, `fault(run_dir, n)` every `args.every` s; its journal's summary."""
    run_dir = tiny_run(root, name, checkpoint={"every_steps": 0, "every_seconds": args.interval, "keep_last": 2,
                                               **checkpoint}, supervisor=supervisor, per_class=args.per_class)
    sup = start_supervisor(run_dir, env)
    end = time.monotonic() + args.minutes * 60
    next_fault, count = time.monotonic() + args.every, 0
    try:
        while time.monotonic() < end:
            time.sleep(0.2)
            if time.monotonic() >= next_fault:
                count += fault(run_dir, count)
                next_fault += args.every
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=300)
    events = read_events(run_dir)
    # The same journal counted the way it was before issue 22: a restart ends when the supervisor's poll saw the
    # worker ready, not at the worker's own moment (worker_ready's ready_at).
    polled = summarize([{**e, "data": {k: v for k, v in e["data"].items() if k != "ready_at"}} for e in events])
    return {**summarize(events), "faults": count, "polled": polled}


def report(s: dict, what: str, args, targets: str) -> None:
    print(f"goodput with {what} for {args.minutes:g} min ({s['faults']} faults, checkpoint every {args.interval:g} s, "
          f"{'cold' if args.cold else 'warm standby'}; {machine()}):")
    print(f"  supervised {s['supervised_seconds']:.0f} s: training {s['training_seconds']:.1f} s, re-done "
          f"{s['redone_seconds']:.1f} s, restarts {s['restart_seconds']:.1f} s, start-up {s['startup_seconds']:.1f} s, "
          f"blocked on checkpoints {s['checkpoint_blocked_seconds']:.1f} s")
    print(f"  goodput {s['goodput']:.1%} ({targets})")
    p = s["polled"]
    print(f"  (counted to the supervisor's poll instead of the worker's own ready moment: restarts "
          f"{p['restart_seconds']:.1f} s, start-up {p['startup_seconds']:.1f} s, goodput {p['goodput']:.1%})")


if __name__ == "__main__":
    main()
