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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from trainctl.supervisor.demo_data import make_dataset
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.report import summarize
from trainctl.worker import config as configlib
from trainctl.worker import fsio
from trainctl.worker.protocol import read_heartbeat

CONFIG = """\
[run]
name = "goodput"
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
log_every_steps = 1000
[checkpoint]
every_steps = 0
every_seconds = {interval}
keep_last = 2
[supervisor]
warm_standby = {warm}
keep_awake = false
[[profiles]]
device = "cpu"
batch_size = 8
"""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=float, default=60, help="seconds between SIGKILLs")
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--interval", type=float, default=2.0, help="[checkpoint] every_seconds")
    p.add_argument("--cold", action="store_true", help="without the warm standby")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="trainctl-goodput-"))
    make_dataset(root / "data", per_class_train=24, per_class_val=0, size=40, seed=1)
    path = root / "run.toml"
    path.write_text(CONFIG.format(interval=args.interval, warm=str(not args.cold).lower()))
    cfg = configlib.load(path)
    cfg.run_dir.mkdir(parents=True)
    fsio.atomic_write(cfg.run_dir / "config.toml", configlib.to_toml(cfg))
    sup = subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(cfg.run_dir)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + args.minutes * 60
    next_kill, kills = time.monotonic() + args.every, 0
    try:
        while time.monotonic() < end:
            time.sleep(0.2)
            if time.monotonic() >= next_kill:
                hb = read_heartbeat(cfg.run_dir) or {}
                if hb.get("pid") and hb.get("phase") == "training":
                    os.kill(hb["pid"], signal.SIGKILL)
                    kills += 1
                next_kill += args.every
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=300)
    s = summarize(read_events(cfg.run_dir))
    print(f"goodput with a SIGKILL every {args.every:g} s for {args.minutes:g} min ({kills} kills, checkpoint every "
          f"{args.interval:g} s, {'cold' if args.cold else 'warm standby'}; {machine()}):")
    print(f"  supervised {s['supervised_seconds']:.0f} s: training {s['training_seconds']:.1f} s, re-done "
          f"{s['redone_seconds']:.1f} s, restarts {s['restart_seconds']:.1f} s, start-up {s['startup_seconds']:.1f} s, "
          f"blocked on checkpoints {s['checkpoint_blocked_seconds']:.1f} s")
    print(f"  goodput {s['goodput']:.1%} (targets: >= 90% at 60 s, >= 97% at 300 s)")
    return {**s, "kills": kills}


if __name__ == "__main__":
    main()
