"""The supervisor's own cost while it supervises: CPU share of one core and memory (it never imports torch).

A tiny model trains under a real supervisor for a while; the supervisor's CPU time and RSS are read
with psutil from outside, after the worker is up (the one-off start-up is reported separately).

    python bench/supervisor_cost.py [--seconds 120] [--poll 1.0]
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from trainctl.supervisor.demo_data import make_dataset
from trainctl.worker import config as configlib
from trainctl.worker import fsio
from trainctl.worker.protocol import read_heartbeat

CONFIG = """\
[run]
name = "cost"
runs_dir = "runs"
[model]
name = "test_vit"
img_size = 32
[data]
train_dir = "data/train"
[train]
epochs = 100000
effective_batch_size = 16
lr = 1e-3
threads = 1
[checkpoint]
every_steps = 50
[supervisor]
poll_seconds = {poll}
keep_awake = false
[[profiles]]
device = "cpu"
batch_size = 8
"""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--poll", type=float, default=1.0)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="trainctl-cost-"))
    make_dataset(root / "data", per_class_train=24, per_class_val=0, size=40, seed=1)
    path = root / "run.toml"
    path.write_text(CONFIG.format(poll=args.poll))
    cfg = configlib.load(path)
    cfg.run_dir.mkdir(parents=True)
    fsio.atomic_write(cfg.run_dir / "config.toml", configlib.to_toml(cfg))
    sup = subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(cfg.run_dir)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(sup.pid)
    try:
        while (read_heartbeat(cfg.run_dir) or {}).get("phase") != "training":
            time.sleep(0.2)
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
    print(f"supervisor cost over {wall:.0f} s of training, poll every {args.poll:g} s ({machine()}):")
    print(f"  CPU {result['cpu_share']:.3%} of one core (target <= 1%); RSS {result['rss'] / 2**20:.1f} MiB, "
          f"peak {result['peak_rss'] / 2**20:.1f} MiB (target <= 60 MB); start-up CPU {result['startup_cpu']:.2f} s")
    return result


if __name__ == "__main__":
    main()
