"""`trainctl demo`: synthetic shapes, a tiny timm model on the CPU, and a crash on purpose midway."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from trainctl.contract.config import load
from trainctl.contract.lifecycle import State, is_final
from trainctl.contract.names import shell_path
from trainctl.contract.protocol import read_heartbeat
from trainctl.contract.runfolder import newest_checkpoint

from . import runstate
from .demo_data import CLASSES, make_dataset, small_config
from .foreground import run_foreground
from .launch import check_data, freeze
from .status import gather
from .text import plural

HEADER = """\
# The trainctl demo: 4 classes of synthetic shapes, a tiny timm model (test_resnet, 0.37M parameters), the CPU.
# Rung 1: batch 16; rung 2: batch 8 x accumulation 2, the same effective batch."""


def demo_config(name: str, epochs: int) -> str:
    return small_config(name, "data/train", "data/val", header=HEADER,
                        model={"name": "test_resnet", "img_size": 64}, data={"crop_scale": [0.6, 1.0]},
                        train={"epochs": epochs, "lr": 3e-3, "warmup_epochs": 1, "log_every_steps": 5, "threads": None},
                        checkpoint={"every_steps": 5, "every_seconds": 60, "keep_last": 3},
                        supervisor={"backoff_seconds": [1, 5, 30], "hang_timeout_seconds": 120},
                        profiles=[{"device": "cpu", "batch_size": 16}, {"device": "cpu", "batch_size": 8}])


def run_demo(folder: Path, fast: bool, console: Console) -> int:
    """Make the data and config under `folder`, then train in the foreground with one staged crash."""
    folder = folder.resolve()
    per_class = 48 if fast else 96
    if not (folder / "data" / "train").is_dir():
        console.print(f"[bold]demo:[/] writing {len(CLASSES)} classes of synthetic shapes to {escape(str(folder / 'data'))}")
        make_dataset(folder / "data", per_class_train=per_class, per_class_val=16, size=64)
    name = "demo-" + time.strftime("%Y%m%d-%H%M%S")
    config_path = folder / f"{name}.toml"
    config_path.write_text(demo_config(name, epochs=4 if fast else 8))
    cfg = load(config_path)
    check_data(cfg)
    freeze(cfg.run_dir, cfg)
    console.print(f"[bold]demo:[/] config {escape(str(config_path))}\n[bold]demo:[/] training {cfg.model.name} on the CPU; "
                  f"midway the demo kills its own worker with SIGKILL (as the OOM killer would).")
    threading.Thread(target=_crash_midway, args=(cfg.run_dir, console), daemon=True).start()
    code = run_foreground(cfg.run_dir, 0, console)
    st = gather(cfg.run_dir)
    val = st.metrics.get("val_acc") or []
    chance = 1 / len(CLASSES)
    if st.state == State.SUCCEEDED and val:
        console.print(f"[bold green]demo finished:[/] validation accuracy {val[-1]:.1%} (chance is {chance:.0%}), "
                      f"{plural(st.restarts, 'restart')}, crashes: {', '.join(c.kind for c in st.crashes) or 'none'}.\n"
                      f"  model:  {escape(shell_path(st.final_model))}\n"
                      f"  status: trainctl status {escape(shell_path(cfg.run_dir))}",
                      highlight=False, soft_wrap=True)
    return code


def _crash_midway(run_dir: Path, console: Console) -> None:
    """Once half the steps are done and a checkpoint exists, SIGKILL the worker — once."""
    while True:
        time.sleep(0.2)
        saved, hb = runstate.read_state(run_dir), read_heartbeat(run_dir)
        if saved is None or hb is None:
            continue
        if is_final(saved.state):
            return
        pid = saved.worker_pid
        if (hb.total_steps and pid and hb.attempt == 1 and hb.step >= hb.total_steps // 2
                and newest_checkpoint(run_dir)):
            console.print(f"[bold red]demo: killing the worker (pid {pid}) with SIGKILL at step {hb.step} "
                          f"— watch trainctl notice and resume from the last checkpoint[/]")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
