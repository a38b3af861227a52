"""`trainctl demo`: synthetic shapes, a tiny timm model on the CPU, and a crash on purpose midway."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from trainctl.worker.config import load
from trainctl.worker.protocol import committed_checkpoints, read_heartbeat

from . import runstate
from .cli import check_data, freeze
from .demo_data import CLASSES, make_dataset
from .foreground import run_foreground
from .status import gather

CONFIG = """\
# The trainctl demo: 4 classes of synthetic shapes, a tiny timm model, the CPU.
[run]
name = "{name}"
runs_dir = "runs"
seed = 42

[model]
name = "test_resnet"        # a 0.37M-parameter timm test model: trains in seconds on a CPU
img_size = 64

[data]
train_dir = "data/train"
val_dir = "data/val"
crop_scale = [0.6, 1.0]

[train]
epochs = {epochs}
effective_batch_size = 16
lr = 3e-3
warmup_epochs = 1
log_every_steps = 5

[checkpoint]
every_steps = 5
every_seconds = 60
keep_last = 3

[supervisor]
backoff_seconds = [1, 5, 30]
hang_timeout_seconds = 120

[[profiles]]                # rung 1: batch 16, no gradient accumulation
device = "cpu"
batch_size = 16

[[profiles]]                # rung 2: batch 8 x accumulation 2 — the same effective batch
device = "cpu"
batch_size = 8
"""


def run_demo(folder: Path, fast: bool, console: Console) -> int:
    """Make the data and config under `folder`, then train in the foreground with one staged crash."""
    folder = folder.resolve()
    per_class = 48 if fast else 96
    if not (folder / "data" / "train").is_dir():
        console.print(f"[bold]demo:[/] writing {len(CLASSES)} classes of synthetic shapes to {escape(str(folder / 'data'))}")
        make_dataset(folder / "data", per_class_train=per_class, per_class_val=16, size=64)
    name = "demo-" + time.strftime("%Y%m%d-%H%M%S")
    config_path = folder / f"{name}.toml"
    config_path.write_text(CONFIG.format(name=name, epochs=4 if fast else 8))
    cfg = load(config_path)
    check_data(cfg)
    freeze(cfg.run_dir, cfg)
    console.print(f"[bold]demo:[/] config {escape(str(config_path))}\n[bold]demo:[/] training {cfg.model.name} on the CPU; "
                  f"midway the demo kills its own worker with SIGKILL (as the OOM killer would).")
    threading.Thread(target=_crash_midway, args=(cfg.run_dir, console), daemon=True).start()
    code = run_foreground(cfg.run_dir, 0, console)
    st = gather(cfg.run_dir)
    val = (st.get("metrics") or {}).get("val_acc") or []
    chance = 1 / len(CLASSES)
    if st["state"] == "succeeded" and val:
        console.print(f"[bold green]demo finished:[/] validation accuracy {val[-1]:.1%} (chance is {chance:.0%}), "
                      f"{st['restarts']} restart(s), crashes: {', '.join(c['kind'] for c in st['crashes']) or 'none'}.\n"
                      f"  model:  {escape(st['final_model'])}\n  status: trainctl status {escape(str(cfg.run_dir))}",
                      highlight=False)
    return code


def _crash_midway(run_dir: Path, console: Console) -> None:
    """Once half the steps are done and a checkpoint exists, SIGKILL the worker — once."""
    while True:
        time.sleep(0.2)
        state = runstate.read_state(run_dir) or {}
        hb = read_heartbeat(run_dir) or {}
        if state.get("state") in ("succeeded", "failed", "stopped"):
            return
        total, pid = hb.get("total_steps"), state.get("worker_pid")
        if (total and pid and hb.get("attempt") == 1 and hb.get("step", 0) >= total // 2
                and committed_checkpoints(run_dir / "checkpoints")):
            console.print(f"[bold red]demo: killing the worker (pid {pid}) with SIGKILL at step {hb['step']} "
                          f"— watch trainctl notice and resume from the last checkpoint[/]")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
