"""What Mixup/CutMix over the effective batch costs in decode work (issue 18): samples decoded per optimizer step,
as a multiple of the effective batch E, for each micro-batch size, in-process (num_workers = 0: one step cache) and
with loader processes (each keeps its own cache; the DataLoader hands micro-batches to its processes in turn).

A micro-batch of positions [k, k+b) of a step needs its partners E-1-i: for b < E those lie in another micro-batch,
so without a cache every sample would be decoded twice. Counted, not timed: the count is the work (each decode is
the same cost), and it does not depend on the machine.

    python bench/mixup_cost.py [--effective 64] [--steps 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from trainctl.contract.folders import scan
from trainctl.supervisor.demo_data import make_dataset
from trainctl.worker.data import MicroBatches
from trainctl.worker.images import Recipe


def decoded_per_step(folder, E: int, b: int, workers: int, steps: int) -> float:
    """Samples decoded per step over `steps` steps, micro-batches of `b` dealt in turn to `workers` processes'
    datasets (workers = 1: in-process)."""
    loaders = [MicroBatches(folder, Recipe(size=32), 7, b, True, pairing=E) for _ in range(workers)]
    turn = 0
    for step in range(steps):
        for start in range(step * E, (step + 1) * E, b):
            loaders[turn % workers][(0, start)]
            turn += 1
    return sum(d.decoded for d in loaders) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--effective", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    E = args.effective
    with tempfile.TemporaryDirectory() as tmp:
        train, _ = make_dataset(Path(tmp), per_class_train=(E * args.steps) // 4 + 1, per_class_val=1, size=40)
        folder = scan(train, (".jpg", ".png"))
        sizes = [b for b in (E, E // 2, 8, 2, 1) if b >= 1 and E % b == 0]
        table = {b: {w: decoded_per_step(folder, E, b, w, args.steps) / E for w in (1, 2, 4)} for b in sizes}
    print(f"Mixup/CutMix decode work per optimizer step, as a multiple of E = {E} ({machine()}):")
    print("| micro-batch | accumulation | in-process | 2 loader processes | 4 loader processes |")
    print("|---:|---:|---:|---:|---:|")
    for b, row in table.items():
        print(f"| {b} | {E // b} | {row[1]:.2f}x | {row[2]:.2f}x | {row[4]:.2f}x |")
    return table


if __name__ == "__main__":
    main()
