"""What exact resume's deterministic kernels cost a training step, with no data loading in the way.

The worker's default `[train] deterministic = true` sets CUBLAS_WORKSPACE_CONFIG before CUDA starts and
`torch.use_deterministic_algorithms(True, warn_only=True)` (deterministic cuDNN/cuBLAS kernels); a plain
timm loop sets neither. Here the same model trains on one synthetic batch, kept on the device, with and
without those two settings; each variant in its own process (cuBLAS reads its workspace setting once),
alternated and repeated. On the CPU the two should not differ; on a GPU this isolates the suspect behind
the GPU throughput figure in bench/RESULTS.md.

    python bench/determinism_cost.py [--device cuda] [--model resnet50] [--batch 64] [--steps 40] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternated, machine  # noqa: E402

WARM_UP = 5


def child(args) -> float:
    """Steady-state images/s of `args.steps` optimizer steps on one synthetic batch."""
    import timm
    import timm.optim
    import torch
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)   # as worker/train.py does
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=4).to(args.device).train()
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 4, (args.batch,), device=args.device)
    for step in range(WARM_UP + args.steps):
        if step == WARM_UP:
            start = time.perf_counter()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()   # each step, as the worker and the plain loop in throughput.py do: the step is done
    return args.steps * args.batch / (time.perf_counter() - start)


def run(args, deterministic: bool) -> float:
    env = dict(os.environ)
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"   # what worker/main.py sets before CUDA starts
    cmd = [sys.executable, __file__, "--child", "--device", args.device, "--model", args.model, "--batch",
           str(args.batch), "--size", str(args.size), "--steps", str(args.steps)] + (["--deterministic"] if deterministic else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(child(args))
        return {}
    variants = {"deterministic = true": lambda: run(args, True), "deterministic = false": lambda: run(args, False)}
    runs = alternated(variants, args.repeats, "images/s")
    result = {k: statistics.median(v) for k, v in runs.items()}
    result["ratio"] = result["deterministic = true"] / result["deterministic = false"]
    print(f"deterministic kernels, {args.model}, batch {args.batch}, {args.size} px, synthetic batch on {args.device}, "
          f"{args.steps} steps after {WARM_UP} ({machine()}), median of {args.repeats}:")
    for name in variants:
        print(f"  {name:22s} {result[name]:8.1f} images/s")
    print(f"  deterministic / not: {result['ratio']:.3f}x")
    return result


if __name__ == "__main__":
    main()
