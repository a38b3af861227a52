"""Training throughput: trainctl supervised vs the same worker run directly vs a plain loop on timm's pipeline.

Same model, batch, torch threads and photo-sized JPEGs; steady-state images/s measured from step
timestamps (the first steps are skipped), runs alternated and repeated.

    python bench/throughput.py [--model mobilenetv3_small_100] [--steps 40] [--repeats 3] [--device cpu] [--workers 0]
                               [--skip 3] [--photos N]   # N photos cycled through (default: one epoch of steps x batch)
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, alternated, frozen_run, machine, medians, photos, subset  # noqa: E402

SKIP = 3   # warm-up steps left out of the measurement (--skip; with loader processes: their prefetch too)


def plain_loop(args, folder: Path) -> float:
    """What a user writes with timm alone; returns steady-state images/s."""
    import timm
    import timm.data
    import timm.optim
    import torch
    batch, device = args.batch, args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=4).to(device)
    cfg = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**cfg, is_training=True, color_jitter=None, auto_augment=None, re_prob=0.0)
    loader = torch.utils.data.DataLoader(timm.data.ImageDataset(str(folder), transform=transform), batch_size=batch,
                                         shuffle=True, drop_last=True, num_workers=args.workers,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    times = []
    while len(times) < args.steps:
        for x, y in loader:
            loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()   # the loss is logged every step, as trainctl's worker does (and on a GPU: the step is done)
            times.append(time.perf_counter())
            if len(times) == args.steps:
                break
    return images_per_second(times, args)


def images_per_second(times: list[float], args) -> float:
    """Steady state: the first `--skip` steps (start-up, the loaders filling their queues) left out."""
    if len(times) < args.steps:
        raise RuntimeError(f"only {len(times)} of {args.steps} steps were timed")
    times = times[:args.steps]
    return (len(times) - args.skip - 1) * args.batch / (times[-1] - times[args.skip])


def trainctl_run(args, folder: Path, how: str = "supervised", deterministic: bool = True, nproc: int = 1) -> float:
    """One trainctl run over `folder`, started `how`: "supervised" (the supervisor), "direct" (the worker alone) or
    "torchrun" (the command a group rung runs, without trainctl's agent or supervisor); with `nproc` processes,
    each takes batch / nproc images and threads / nproc threads. Returns steady-state images/s."""
    from trainctl.supervisor.demo_data import small_config  # not at the top: the plain loop's process runs this file
    from trainctl.worker import group
    root = Path(tempfile.mkdtemp(prefix="trainctl-tput-"))
    epochs = math.ceil(args.steps / (args.photos // args.batch))   # as many as `steps` needs
    run_dir = frozen_run(root / "run.toml", small_config(
        "tput", folder,
        run={"runs_dir": str(root / "runs")},
        model={"name": args.model, "img_size": None},
        data={"crop_scale": None},
        train={"epochs": epochs, "effective_batch_size": args.batch, "threads": max(1, args.threads // nproc),
               "log_every_steps": 1, "deterministic": deterministic},
        checkpoint={"every_steps": 0, "every_seconds": 0},
        supervisor={"keep_awake": False},
        profiles=[{"device": args.device, "batch_size": args.batch // nproc, "num_workers": args.workers,
                   "nproc_per_node": nproc}]))
    cmd = {"supervised": [sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
           "direct": [sys.executable, "-m", "trainctl.worker", "--run-dir", str(run_dir)],
           "torchrun": [sys.executable, "-m", "torch.distributed.run", *group.torchrun_args(
               argparse.Namespace(nproc=nproc, run_dir=run_dir, rung=1, attempt=1))]}[how]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return images_per_second([x["time"] for x in lines if x.get("kind") == "train"], args)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mobilenetv3_small_100")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="where the model trains (cpu, cuda)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes, for both loops")
    p.add_argument("--skip", type=int, default=SKIP, help="first steps left out (>= 2 x workers: their prefetch)")
    p.add_argument("--photos", type=int, default=0, help="photos to cycle through (default: steps x batch, one epoch)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)   # the plain loop's process, over this folder
    args = p.parse_args(argv)
    args.photos = args.photos or args.steps * args.batch
    if args.child:
        print(plain_loop(args, args.child))
        return {}
    started = time.monotonic()
    folder = subset(photos(OUT / "photos", args.photos), args.photos)
    print(f"  photos ready after {time.monotonic() - started:.0f} s", flush=True)

    def plain() -> float:
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--model", args.model, "--batch", str(args.batch),
                              "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device,
                              "--workers", str(args.workers), "--skip", str(args.skip), "--photos", str(args.photos)],
                             capture_output=True, text=True, check=True).stdout
        return float(out.strip().splitlines()[-1])

    variants = {"plain timm loop": plain,
                "trainctl worker, direct": lambda: trainctl_run(args, folder, "direct"),
                "trainctl supervised": lambda: trainctl_run(args, folder, "supervised")}
    if args.device != "cpu":   # exact resume's deterministic kernels cost nothing on the CPU, something on a GPU
        variants["supervised, deterministic=false"] = lambda: trainctl_run(args, folder, "supervised", deterministic=False)
    runs = alternated(variants, args.repeats, "images/s")
    result = medians(runs, f"training throughput, {args.model}, batch {args.batch}, {args.threads} threads, "
                           f"{args.workers} loader processes, device {args.device}, photos ({machine()}), "
                           f"median of {args.repeats}:")
    result["supervised_vs_plain"] = result["trainctl supervised"] / result["plain timm loop"]
    result["supervised_vs_direct"] = result["trainctl supervised"] / result["trainctl worker, direct"]
    print(f"  supervised / plain timm loop: {result['supervised_vs_plain']:.2f}x (target >= 1.0); "
          f"supervised / direct: {result['supervised_vs_direct']:.3f}x (target >= 0.98)")
    if "supervised, deterministic=false" in result:
        result["nondeterministic_vs_plain"] = result["supervised, deterministic=false"] / result["plain timm loop"]
        print(f"  supervised with deterministic = false / plain timm loop: {result['nondeterministic_vs_plain']:.2f}x")
    return result


if __name__ == "__main__":
    main()
