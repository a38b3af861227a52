"""A real out-of-memory error on an accelerator, and the supervisor stepping down the ladder.

The first rung asks for a micro-batch that cannot fit on the GPU (ViT-Base at 448 px, batch 512:
several hundred GiB of activations); the second keeps the effective batch with a smaller micro-batch
and more accumulation. Nothing is simulated: the worker's first forward pass runs out of device
memory, the worker reports it and exits, the supervisor classifies the exit and restarts on rung 2,
and the run trains to the end. Prints the journal, `trainctl status` and what the checks found.

    python bench/oom_ladder.py [--device cuda] [--batch 512] [--small-batch 32]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import frozen_run, machine, start_supervisor  # noqa: E402

from trainctl.contract.lifecycle import Event, State
from trainctl.supervisor.demo_data import CLASSES, make_dataset, small_config
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.runstate import read_state


def config(args, root: Path) -> str:
    """Rung 1: the whole effective batch in one micro-batch; rung 2: the same with more accumulation."""
    rung = {"device": args.device, "num_workers": args.workers}
    return small_config(
        "oom-ladder", root / "data/train",
        run={"runs_dir": str(root / "runs")},
        model={"name": args.model, "img_size": args.img_size},
        data={"crop_scale": None},
        train={"epochs": 1, "effective_batch_size": args.batch, "lr": 1e-4, "threads": None, "log_every_steps": 1},
        checkpoint={"every_steps": 1},
        supervisor={"keep_awake": False},
        profiles=[{**rung, "batch_size": args.batch}, {**rung, "batch_size": args.small_batch}])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=448)
    p.add_argument("--batch", type=int, default=512, help="rung 1's micro-batch (= the effective batch)")
    p.add_argument("--small-batch", type=int, default=32, help="rung 2's micro-batch")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="trainctl-oom-"))
    # two optimizer steps' worth of images (the demo's shapes, small files: loading is not what is tested)
    make_dataset(root / "data", per_class_train=2 * args.batch // len(CLASSES), per_class_val=0, size=48, seed=1)
    run_dir = frozen_run(root / "run.toml", config(args, root))
    started = time.monotonic()
    sup = start_supervisor(run_dir)
    try:
        sup.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        sup.kill()
        print(f"supervisor still running after {args.timeout:.0f} s: killed")
    print(f"OOM ladder on {args.device} ({machine()}), {args.model} at {args.img_size} px, effective batch {args.batch}: "
          f"rung 1 batch {args.batch} x 1, rung 2 batch {args.small_batch} x {args.batch // args.small_batch}; "
          f"{time.monotonic() - started:.1f} s")
    events = read_events(run_dir)
    for e in events:
        data = {k: v for k, v in e["data"].items() if k in ("failure", "detail", "rung", "exit_code", "signal")}
        print(f"  journal: {e['kind']:12s} attempt {e['attempt']} rung {e['rung'] + 1} step {e['step']} {data}")
    from trainctl.supervisor.cli import main as trainctl
    trainctl(["status", str(run_dir)])
    exits = [e for e in events if e["kind"] == Event.EXIT]
    state = read_state(run_dir)
    checks = {
        "attempt 1 on rung 1 ended as oom": bool(exits) and exits[0]["rung"] == 0
        and exits[0]["data"].get("failure") == "oom",
        "the next attempt ran on rung 2": any(e["kind"] == Event.SPAWN and e["rung"] == 1 for e in events),
        "the run finished": state is not None and state.state == State.SUCCEEDED,
        "the weights were exported": (run_dir / "model.safetensors").exists(),
    }
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
