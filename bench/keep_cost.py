"""What the checkpoint at failure costs every step: `StepStart.keep()` (worker/snapshot.py) copies the model's
buffers (BatchNorm statistics) and the RNG states at each optimizer step's start, so that a step that fails
half-way can be undone exactly before the state is written. Measured against one AdamW training step of the same
model, in the same process, on the CPU (1 thread): the ratio is what counts.

    python bench/keep_cost.py [--model resnet50] [--calls 300]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    import timm
    import torch

    from trainctl.worker.snapshot import StepStart
    torch.set_num_threads(1)
    model = timm.create_model(args.model, num_classes=10).train()
    buffers = list(model.buffers())
    size = sum(b.numel() * b.element_size() for b in buffers)
    keeper = StepStart(model, torch.device("cpu"))
    for _ in range(20):   # warm up
        keeper.keep()
    times = []
    for _ in range(args.calls):
        t = time.perf_counter()
        keeper.keep()
        times.append(time.perf_counter() - t)
    keep = statistics.median(times)
    print(f"keep cost, {args.model} ({len(buffers)} buffers, {size / 1024:.0f} KiB), CPU 1 thread ({machine()}):")
    print(f"  keep()              median {keep * 1e3:.3f} ms, p90 {sorted(times)[int(len(times) * 0.9)] * 1e3:.3f} ms")
    opt = torch.optim.AdamW(model.parameters())
    for batch in (1, 8):
        x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
        steps = []
        for i in range(4):
            t = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:   # the first step allocates AdamW's state
                steps.append(time.perf_counter() - t)
        step = statistics.median(steps)
        print(f"  step, batch {batch}       {step:.3f} s: keep / step = {keep / step:.1e} ({keep / step:.4%})")


if __name__ == "__main__":
    main()
