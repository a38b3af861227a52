"""Recovery time (MTTR): from a worker's SIGKILL to the first optimizer step after the restore.

A tiny model (test_vit, 32 px) trains under a real supervisor with the default backoff; the worker is
SIGKILLed N times, each time after it committed a checkpoint (a crash after progress: restarted at once),
and each recovery is split into: detection, backoff, process start, imports, data scan + checkpoint load,
model build, sanity check (once per rung: skipped on a restart), first step — cold (a new Python process)
and warm (`warm_standby = true`: a standby worker has already imported torch and timm and built the model).

    python bench/recovery.py [--kills 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, start_supervisor, tiny_run  # noqa: E402

from trainctl.contract.lifecycle import State
from trainctl.contract.protocol import Heartbeat, read_heartbeat
from trainctl.contract.runfolder import newest_checkpoint
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.runstate import read_state
from trainctl.supervisor.waiting import wait_for

PARTS = ("detection", "backoff", "process start", "imports", "data + checkpoint load", "model build",
         "sanity check", "first step")


def training(run_dir: Path, attempt: int) -> Heartbeat | None:
    """Attempt `attempt`'s heartbeat once it has done its first optimizer step, else None."""
    hb = read_heartbeat(run_dir)
    return hb if hb and hb.attempt == attempt and "first_step" in hb.timings else None


def trained(run_dir: Path, attempt: int) -> Heartbeat:
    return wait_for(lambda: training(run_dir, attempt), 120, interval=0.02, what=f"attempt {attempt}'s first step")


def standby_rss(run_dir: Path) -> int:
    """Resident memory of the waiting standby worker (what `warm_standby` costs)."""
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "--standby" in cmd and str(run_dir) in cmd:
            return p.info["memory_info"].rss
    return 0


def measure(root: Path, warm: bool, kills: int, device: str) -> list[dict]:
    run_dir = tiny_run(root, "warm" if warm else "cold", checkpoint={"every_steps": 20, "keep_last": 2},
                       supervisor={"warm_standby": warm}, device=device)
    sup = start_supervisor(run_dir)
    out = []
    try:
        for attempt in range(1, kills + 1):
            trained(run_dir, attempt)
            time.sleep(8 if warm else 2)    # warm: let the standby finish its own imports first
            started_at = next(e["step"] for e in read_events(run_dir)
                              if e["kind"] == "spawn" and e["attempt"] == attempt)
            wait_for(lambda: (c := newest_checkpoint(run_dir)) is not None and c.step > (started_at or 0), 120,
                     interval=0.02, what=f"a checkpoint of attempt {attempt}")   # progress: restarted at once
            hb = read_heartbeat(run_dir)
            rss = standby_rss(run_dir) if warm else 0
            killed = time.time()
            os.kill(hb.pid, signal.SIGKILL)
            t = trained(run_dir, attempt + 1).timings
            events = read_events(run_dir)
            ended = next(e["time"] for e in events if e["kind"] == "exit" and e["attempt"] == attempt)
            spawned = next(e["time"] for e in events if e["kind"] == "spawn" and e["attempt"] == attempt + 1)
            started = t.get("go", t["imported"])
            parts = {"detection": ended - killed, "backoff": spawned - ended,
                     "process start": (t["go"] - spawned) if "go" in t else (t["process_start"] - spawned),
                     "imports": 0.0 if "go" in t else t["imported"] - t["process_start"],
                     "data + checkpoint load": t["checkpoint_loaded"] - started,
                     "model build": t["model_built"] - t["checkpoint_loaded"],
                     "sanity check": t["sanity_done"] - t["model_built"],
                     "first step": t["first_step"] - t["sanity_done"]}
            parts["total"] = t["first_step"] - killed
            parts["standby_rss_mib"] = rss / 2**20
            parts["prebuild"] = t["prebuilt"] - t["imported"] if "prebuilt" in t else 0.0   # before GO: not waited for
            parts["delay"] = next(e["data"]["delay"] for e in events
                                  if e["kind"] == "restart" and e["attempt"] == attempt)   # the policy's backoff
            parts["beyond imports"] = parts["total"] - parts["imports"]
            out.append(parts)
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=120)
    assert read_state(run_dir).state == State.STOPPED
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--device", default="cpu", help="the rung's device (cpu, cuda, mps)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="trainctl-mttr-"))
    result = {}
    for warm in (False, True):
        runs = measure(root, warm, args.kills, args.device)
        keys = (*PARTS, "total", "beyond imports", "standby_rss_mib", "prebuild", "delay")
        result["warm" if warm else "cold"] = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(f"recovery time after SIGKILL, device {args.device} ({machine()}), median of {args.kills}, default backoff:")
    print(f"  {'part':24s} {'cold':>8s} {'warm':>8s}")
    for k in (*PARTS, "total", "beyond imports"):
        print(f"  {k:24s} {result['cold'][k]:7.2f}s {result['warm'][k]:7.2f}s")
    print(f"  the waiting standby worker's RSS: {result['warm']['standby_rss_mib']:.0f} MiB; it built the model in "
          f"{result['warm']['prebuild']:.2f} s before it was told GO")
    print(f"  the policy's restart delay (median): cold {result['cold']['delay']:g} s, "
          f"warm {result['warm']['delay']:g} s")
    print("  target: warm total <= 1.0 s; cold total <= imports + 1.0 s")
    return result


if __name__ == "__main__":
    main()
