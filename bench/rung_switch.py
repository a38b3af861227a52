"""How far a run that switches rung (batch 8 x accum 2 -> batch 4 x accum 4) ends from one that never did.

The two compute the same updates up to float summation order; the difference then grows with the
number of steps trained after the switch. Prints the max |w_switched - w_reference| per horizon.
--mixup: with Mixup/CutMix on (mixup_alpha 0.8, cutmix_alpha 1.0, the issue's recipe) and the ladder batch 4 x
accum 4 -> batch 1 x accum 16 (issue 18: the same pairs and λ at micro-batch 1).
--group: a group of two processes (Gloo, batch 4 x 2 processes x accum 2) -> one process (batch 4 x accum 4):
a change of K (issue 19), the group run by torchrun through trainctl.worker.group as the supervisor runs it.

    python bench/rung_switch.py [--epochs 6] [--mixup | --group]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from trainctl.supervisor.demo_data import make_dataset, small_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import frozen_run  # noqa: E402


def worker(run_dir: Path, rung: int, faults: str = "", nproc: int = 1) -> None:
    """Run the worker (nproc > 1: a group under torchrun) on rung `rung` (1 = the first); with `faults`, it is
    expected to die."""
    env = {**os.environ, "TRAINCTL_FAULTS": faults}
    module = ["trainctl.worker.group", "--attempt", "0", "--nproc", str(nproc)] if nproc > 1 else ["trainctl.worker"]
    subprocess.run([sys.executable, "-m", *module, "--run-dir", str(run_dir), "--rung", str(rung)],
                   env=env, capture_output=True, check=faults == "")


def run(root: Path, name: str, epochs: int, mixup: bool = False, group: bool = False) -> Path:
    """Rung 1: batch 8 x accum 2; rung 2: batch 4 x accum 4 (mixup: 4 x 4, then 1 x 16; group: 4 x 2 processes
    x 2, then 4 x 4); a checkpoint after every step, all kept."""
    batches = (4, 1) if mixup else (4, 4) if group else (8, 4)
    profiles = [{"device": "cpu", "batch_size": b} for b in batches]
    if group:
        profiles[0]["nproc_per_node"] = 2
    return frozen_run(root / f"{name}.toml", small_config(
        name, "data/train", run={"seed": 7}, train={"epochs": epochs},
        checkpoint={"every_steps": 1, "keep_last": 100},
        **({"augment": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}} if mixup else {}), profiles=profiles))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--mixup", action="store_true", help="Mixup/CutMix on; batch 4 x 4 -> 1 x 16")
    parser.add_argument("--group", action="store_true", help="2 processes (4 x 2 x 2) -> 1 process (4 x 4)")
    args = parser.parse_args()
    nproc = 2 if args.group else 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root / "data", per_class_train=24, per_class_val=0, size=40, seed=1)
        reference = run(root, "reference", args.epochs, args.mixup, args.group)
        worker(reference, 1, nproc=nproc)
        total = 6 * args.epochs
        ref = load_file(str(reference / "model.safetensors"))
        print(f"{'steps after the switch':>24} | max abs weight difference")
        for after in sorted({1, 3, 10, total // 2, total - 1}):
            switched = run(root, f"switch-{after}", args.epochs, args.mixup, args.group)
            worker(switched, 1, faults=f"train_step:sigkill@{total - after}", nproc=nproc)
            worker(switched, 2)
            got = load_file(str(switched / "model.safetensors"))
            diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
            print(f"{after:>24} | {diff:.2e}")


if __name__ == "__main__":
    main()
