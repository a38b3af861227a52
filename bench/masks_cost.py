"""What per-sample drop path / dropout masks (worker/masks.py) cost a training step, beside timm's own draws.

vit_tiny_patch16_224 (drop_path_rate 0.1, drop_rate 0.1: 23 mask draws per forward pass), CPU, one torch thread,
forward + backward of micro-batches of 8 and 1, the two kinds alternated step by step in one process; the ratio
of median step CPU times (process time: what the step costs, whatever else the shared machine runs).

    python bench/masks_cost.py [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from trainctl.worker import masks


def step(model, x, per_sample: bool) -> float:
    started = time.process_time()
    if per_sample:
        with masks.MASKS.drawing(42, 3, 0, x.shape[0]):
            loss = model(x).sum()
    else:
        loss = model(x).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    masks.install()
    torch.set_num_threads(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, drop_path_rate=0.1, drop_rate=0.1).train()
    print(f"{'micro-batch':>11} | timm's draws, s | per-sample masks, s | ratio")
    for batch in (8, 1):
        x = torch.randn(batch, 3, 224, 224)
        step(model, x, True), step(model, x, False)   # warm-up
        times = {True: [], False: []}
        for _ in range(args.steps):
            for per_sample in (False, True):
                times[per_sample].append(step(model, x, per_sample))
        plain, ours = statistics.median(times[False]), statistics.median(times[True])
        print(f"{batch:>11} | {plain:15.4f} | {ours:19.4f} | {ours / plain:.3f}x")


if __name__ == "__main__":
    main()
