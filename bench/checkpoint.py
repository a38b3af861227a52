"""Checkpoint cost for a ViT-Base-size state (eva02_base_patch14_224 + AdamW, ~1 GB), inside real training.

Side by side, alternated, each right after a real optimizer step (forward + backward over `--accum`
micro-batches of `--batch` random images, then AdamW): a plain synchronous `torch.save` + fsync (what
a training loop usually does); trainctl's synchronous commit (hash, fsync, rename, directory fsync,
marker); trainctl's background commit (the writer reads the live weights while the next step's
forward and backward passes run; the next optimizer update waits until it has read them); and, for
the writer's own speed, the same background write with training waiting for it.

For each: the time the training thread is blocked (for the background write: capture, plus any wait
before the next update), how much longer the next step took than a step with no write in flight (two
cores shared by training and writer), and the time until the checkpoint is durable. The disk's own
fsync'd sequential write speed (`dd ... conv=fsync`) is the physical limit.

    python bench/checkpoint.py [--repeats 3] [--batch 2] [--accum 4] [--model eva02_base_patch14_224] [--device cpu]
    python bench/checkpoint.py --writeback-sweep [--repeats 4]   # how often to start writeback (chosen: 16 MiB)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm  # noqa: E402
import timm.optim  # noqa: E402
import timm.scheduler  # noqa: E402
import torch  # noqa: E402
from common import OUT, machine  # noqa: E402

from trainctl.contract.config import Profile  # noqa: E402
from trainctl.worker import checkpoint as checkpointlib  # noqa: E402
from trainctl.worker.ckptwriter import Writer  # noqa: E402
from trainctl.worker.snapshot import Progress, capture, shares_training_memory  # noqa: E402


def trainer_state(model_name: str, device: str) -> SimpleNamespace:
    model = timm.create_model(model_name, pretrained=False, num_classes=100).to(device)
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, num_epochs=100, updates_per_epoch=1, step_on_epochs=False)
    return SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                           progress=Progress(), device=torch.device(device), profile=Profile(batch_size=1, device=device),
                           rung_index=0, identity={"model": model_name}, history=[])


def train_step(t, batch: int, accum: int, before_update=lambda: None) -> float:
    """One optimizer step over `accum` micro-batches; returns its wall time."""
    started = time.perf_counter()
    for _ in range(accum):
        x = torch.randn(batch, 3, 224, 224, device=t.device)
        y = torch.randint(0, 100, (batch,), device=t.device)
        torch.nn.functional.cross_entropy(t.model(x), y).backward()
    before_update()
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.progress.step += 1
    if t.device.type == "cuda":
        torch.cuda.synchronize()   # the step's kernels are queued, not done, when step() returns
    return time.perf_counter() - started


def plain_save(t, folder: Path, args) -> dict:
    started = time.perf_counter()
    with open(folder / f"plain-{t.progress.step}.pt", "wb") as f:
        torch.save(capture(t), f)
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - started
    return {"blocked": took, "durable": took, "next_step": train_step(t, args.batch, args.accum)}


def ours(t, folder: Path, args, background: bool, alone: bool = False) -> dict:
    writer = Writer(folder, keep_last=1, on_phase=lambda phase, s: None, background=background)
    started = time.perf_counter()
    writer.submit(t.progress.step, capture(t, background), {"epoch": 0},
                  shares_training_memory=background and shares_training_memory(t))
    blocked = time.perf_counter() - started
    waited = []

    def before_update():
        at = time.perf_counter()
        writer.wait_released()
        waited.append(time.perf_counter() - at)
    if alone:   # the writer's own speed: training waits for it (not what the worker does)
        writer.wait()
    next_step = train_step(t, args.batch, args.accum, before_update)
    writer.wait()
    return {"blocked": blocked + waited[0], "durable": writer.write_seconds, "next_step": next_step}


def disk_speed(folder: Path, mib: int) -> float:
    target = folder / "dd.bin"
    out = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"],
                         capture_output=True, text=True).stderr
    target.unlink(missing_ok=True)
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    return int(m.group(1)) / float(m.group(2))


def writeback_sweep(t, folder: Path, size: int, repeats: int) -> dict:
    """A synchronous commit with early writeback every N MiB (0 = only the final fsync), alternated."""
    choices = [0, 8, 16, 32, 64]
    times = {mib: [] for mib in choices}
    speeds = []
    for r in range(repeats):
        speeds.append(disk_speed(folder, max(256, size // 2**20)))
        for mib in choices:
            checkpointlib._HashingWriter.WRITEBACK_BYTES = mib << 20
            started = time.perf_counter()
            checkpointlib.save(folder, r, capture(t), 1, {})
            times[mib].append(time.perf_counter() - started)
    disk = statistics.median(speeds)
    print(f"early writeback sweep, {size / 2**30:.2f} GiB, median of {repeats} ({machine()}); "
          f"disk fsync'd write (dd conv=fsync): {disk / 2**20:.0f} MiB/s")
    for mib, ts in times.items():
        took = statistics.median(ts)
        print(f"  writeback every {mib:2d} MiB{' (off)' if not mib else '      '}  commit {took:5.2f} s  "
              f"{size / took / 2**20:6.0f} MiB/s ({size / took / disk:4.0%} of the disk)")
    return {mib: statistics.median(ts) for mib, ts in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--model", default="eva02_base_patch14_224")
    p.add_argument("--dir", type=Path, default=OUT / "ckpt")
    p.add_argument("--writeback-sweep", action="store_true")
    p.add_argument("--device", default="cpu", help="where the model trains (cpu, cuda)")
    args = p.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    torch.manual_seed(0)
    t = trainer_state(args.model, args.device)
    train_step(t, args.batch, args.accum)   # AdamW state (exp_avg, exp_avg_sq) now exists for every parameter
    size = sum(v.numel() * v.element_size() for v in t.model.state_dict().values()) + sum(
        v.numel() * v.element_size() for s in t.optimizer.state_dict()["state"].values() for v in s.values()
        if isinstance(v, torch.Tensor))
    if args.writeback_sweep:
        return writeback_sweep(t, args.dir, size, args.repeats)
    runs = {"plain torch.save + fsync": [], "trainctl sync": [], "trainctl background": [],
            "background writer alone": []}
    speeds, steps = [], []
    for r in range(args.repeats):
        speeds.append(disk_speed(args.dir, max(256, size // 2**20)))
        steps.append(train_step(t, args.batch, args.accum))   # no write in flight: the reference step
        runs["plain torch.save + fsync"].append(plain_save(t, args.dir, args))
        runs["trainctl sync"].append(ours(t, args.dir, args, background=False))
        runs["trainctl background"].append(ours(t, args.dir, args, background=True))
        runs["background writer alone"].append(ours(t, args.dir, args, background=True, alone=True))
        for f in args.dir.glob("plain-*.pt"):
            f.unlink()
    disk, step = statistics.median(speeds), statistics.median(steps)
    result = {"state_bytes": size, "disk_bytes_per_s": disk, "step_seconds": step}
    print(f"checkpoint of {args.model} + AdamW state on {args.device}: {size / 2**30:.2f} GiB ({machine()}), median of "
          f"{args.repeats}; a step = {args.accum} x batch {args.batch}, {step:.2f} s with no write in flight; "
          f"disk fsync'd write (dd conv=fsync): {disk / 2**20:.0f} MiB/s")
    base = statistics.median(r["blocked"] for r in runs["plain torch.save + fsync"])
    for name, rs in runs.items():
        m = {k: statistics.median(r[k] for r in rs) for k in ("blocked", "durable", "next_step")}
        result[name] = m
        print(f"  {name:26s} blocked {m['blocked']:6.2f} s ({m['blocked'] / base:6.1%} of plain)   next step "
              f"+{m['next_step'] - step:5.2f} s   durable after {m['durable']:6.2f} s   commit throughput "
              f"{size / m['durable'] / 2**20:6.0f} MiB/s ({size / m['durable'] / disk:4.0%} of the disk)")
    result["blocked_ratio"] = result["trainctl background"]["blocked"] / base
    result["commit_share_of_disk"] = size / result["trainctl background"]["durable"] / disk
    result["sync_commit_share_of_disk"] = size / result["trainctl sync"]["durable"] / disk
    result["alone_commit_share_of_disk"] = size / result["background writer alone"]["durable"] / disk
    print(f"  targets: blocked <= 10% of plain (got {result['blocked_ratio']:.1%}); commit >= 50% of the disk "
          f"(writer alone {result['alone_commit_share_of_disk']:.0%}, sync {result['sync_commit_share_of_disk']:.0%}; "
          f"{result['commit_share_of_disk']:.0%} beside training)")
    shutil.rmtree(args.dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
