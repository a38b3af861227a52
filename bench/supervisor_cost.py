"""The supervisor's own cost while it supervises: CPU share of one core and memory (it never imports torch).

A tiny model trains under a real supervisor for a while; the supervisor's CPU time and RSS are read
with psutil from outside, after the worker is up (the one-off start-up is reported separately).

    python bench/supervisor_cost.py [--seconds 120] [--poll 1.0] [--nproc 1]   # --nproc 2: a group rung (torchrun)
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, start_supervisor, tiny_run  # noqa: E402

from trainctl.contract.protocol import Phase, read_heartbeat
from trainctl.supervisor.waiting import wait_for

# The worker's start-up (imports, data, model, sanity check) takes seconds here; minutes would mean it is stuck.
STARTUP_TIMEOUT = 600


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--nproc", type=int, default=1, choices=(1, 2, 4, 8), help="processes of the rung")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="trainctl-cost-"))
    run_dir = tiny_run(root, "cost", checkpoint={"every_steps": 50}, supervisor={"poll_seconds": args.poll},
                       nproc=args.nproc)
    sup = start_supervisor(run_dir)
    proc = psutil.Process(sup.pid)
    try:
        wait_for(lambda: (hb := read_heartbeat(run_dir)) and hb.phase == Phase.TRAINING, STARTUP_TIMEOUT,
                 interval=0.2, what="the worker to train")
        startup = proc.cpu_times()
        t0, rss = time.monotonic(), []
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1)
            rss.append(proc.memory_info().rss)
        end = proc.cpu_times()
        wall = time.monotonic() - t0
        with open(f"/proc/{sup.pid}/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=300)
    cpu = (end.user + end.system) - (startup.user + startup.system)
    result = {"cpu_share": cpu / wall, "rss": max(rss), "peak_rss": peak,
              "startup_cpu": startup.user + startup.system}
    rung = f", a group of {args.nproc} processes" if args.nproc > 1 else ""
    print(f"supervisor cost over {wall:.0f} s of training{rung}, poll every {args.poll:g} s ({machine()}):")
    print(f"  CPU {result['cpu_share']:.3%} of one core (target <= 1%); RSS {result['rss'] / 2**20:.1f} MiB, "
          f"peak {result['peak_rss'] / 2**20:.1f} MiB (target <= 60 MB); start-up CPU {result['startup_cpu']:.2f} s")
    return result


if __name__ == "__main__":
    main()
