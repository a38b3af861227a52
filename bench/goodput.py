"""Goodput under faults: a tiny model trains under a supervisor while its worker is SIGKILLed every F seconds.

Goodput = (supervised time − re-done work − restarts − checkpoint blocking) / supervised time,
computed from the run's journal by the same code that writes the morning report.

    python bench/goodput.py --every 60 --minutes 5
    python bench/goodput.py --every 300 --minutes 15
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

from trainctl.contract.protocol import Phase, read_heartbeat
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.report import summarize


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=float, default=60, help="seconds between SIGKILLs")
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--interval", type=float, default=2.0, help="[checkpoint] every_seconds")
    p.add_argument("--cold", action="store_true", help="without the warm standby")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="trainctl-goodput-"))
    run_dir = tiny_run(root, "goodput", checkpoint={"every_steps": 0, "every_seconds": args.interval, "keep_last": 2},
                       supervisor={"warm_standby": not args.cold})
    sup = start_supervisor(run_dir)
    end = time.monotonic() + args.minutes * 60
    next_kill, kills = time.monotonic() + args.every, 0
    try:
        while time.monotonic() < end:
            time.sleep(0.2)
            if time.monotonic() >= next_kill:
                hb = read_heartbeat(run_dir)
                if hb and hb.pid and hb.phase == Phase.TRAINING:
                    os.kill(hb.pid, signal.SIGKILL)
                    kills += 1
                next_kill += args.every
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=300)
    s = summarize(read_events(run_dir))
    print(f"goodput with a SIGKILL every {args.every:g} s for {args.minutes:g} min ({kills} kills, checkpoint every "
          f"{args.interval:g} s, {'cold' if args.cold else 'warm standby'}; {machine()}):")
    print(f"  supervised {s['supervised_seconds']:.0f} s: training {s['training_seconds']:.1f} s, re-done "
          f"{s['redone_seconds']:.1f} s, restarts {s['restart_seconds']:.1f} s, start-up {s['startup_seconds']:.1f} s, "
          f"blocked on checkpoints {s['checkpoint_blocked_seconds']:.1f} s")
    print(f"  goodput {s['goodput']:.1%} (targets: >= 90% at 60 s, >= 97% at 300 s)")
    return {**s, "kills": kills}


if __name__ == "__main__":
    main()
