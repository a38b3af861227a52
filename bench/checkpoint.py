"""Checkpoint cost for a ViT-Base-size state (eva02_base_patch14_224 + AdamW, ~1 GB).

Side by side, alternated: a plain synchronous `torch.save` + fsync (what a training loop usually
does); trainctl's synchronous commit (hash, fsync, rename, directory fsync, marker); trainctl's
asynchronous commit (snapshot to memory, the rest in a background thread). For each: the time the
training thread is blocked, and the time until the checkpoint is durable. The disk's own fsync'd
sequential write speed (`dd ... conv=fsync`) is the physical limit.

    python bench/checkpoint.py [--repeats 3] [--model eva02_base_patch14_224] [--dir bench/out/ckpt]
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
from common import OUT, machine  # noqa: E402

import timm  # noqa: E402
import timm.optim  # noqa: E402
import timm.scheduler  # noqa: E402
import torch  # noqa: E402

from trainctl.worker.ckptwriter import Writer  # noqa: E402
from trainctl.worker.config import Profile  # noqa: E402
from trainctl.worker.snapshot import Progress, capture  # noqa: E402


def trainer_state(model_name: str) -> SimpleNamespace:
    model = timm.create_model(model_name, pretrained=False, num_classes=100)
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()   # AdamW state (exp_avg, exp_avg_sq) now exists for every parameter
    optimizer.zero_grad(set_to_none=True)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, num_epochs=100, updates_per_epoch=1, step_on_epochs=False)
    return SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                           progress=Progress(), device=torch.device("cpu"), profile=Profile(batch_size=1, device="cpu"),
                           profile_index=0, identity={"model": model_name}, history=[])


def plain_save(t, folder: Path, step: int) -> tuple[float, float]:
    started = time.perf_counter()
    path = folder / f"plain-{step}.pt"
    with open(path, "wb") as f:
        torch.save(capture(t), f)
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - started
    return took, took


def ours(t, folder: Path, step: int, background: bool) -> tuple[float, float]:
    writer = Writer(folder, keep_last=1, on_phase=lambda phase, s: None, background=background)
    started = time.perf_counter()
    writer.submit(step, capture(t, copy=background), {"epoch": 0})
    blocked = time.perf_counter() - started
    writer.wait()
    return blocked, time.perf_counter() - started


def disk_speed(folder: Path, mib: int) -> float:
    target = folder / "dd.bin"
    out = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"],
                         capture_output=True, text=True).stderr
    target.unlink(missing_ok=True)
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    return int(m.group(1)) / float(m.group(2))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="eva02_base_patch14_224")
    p.add_argument("--dir", type=Path, default=OUT / "ckpt")
    args = p.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    t = trainer_state(args.model)
    size = sum(v.numel() * v.element_size() for v in t.model.state_dict().values()) + sum(
        v.numel() * v.element_size() for s in t.optimizer.state_dict()["state"].values() for v in s.values()
        if isinstance(v, torch.Tensor))
    runs = {"plain torch.save + fsync": [], "trainctl sync": [], "trainctl async": []}
    speeds = []
    for r in range(args.repeats):
        speeds.append(disk_speed(args.dir, max(256, size // 2**20)))
        runs["plain torch.save + fsync"].append(plain_save(t, args.dir, r))
        runs["trainctl sync"].append(ours(t, args.dir, r, background=False))
        runs["trainctl async"].append(ours(t, args.dir, 1000 + r, background=True))
        for f in args.dir.glob("plain-*.pt"):
            f.unlink()
    disk = statistics.median(speeds)
    result = {"state_bytes": size, "disk_bytes_per_s": disk}
    print(f"checkpoint of {args.model} + AdamW state: {size / 2**30:.2f} GiB ({machine()}), median of "
          f"{args.repeats}; disk fsync'd write (dd conv=fsync): {disk / 2**20:.0f} MiB/s")
    base = statistics.median(b for b, _ in runs["plain torch.save + fsync"])
    for name, rs in runs.items():
        blocked, durable = statistics.median(b for b, _ in rs), statistics.median(d for _, d in rs)
        result[name] = {"blocked": blocked, "durable": durable}
        print(f"  {name:26s} blocked {blocked:6.2f} s ({blocked / base:5.1%} of plain)   durable after "
              f"{durable:6.2f} s   commit throughput {size / durable / 2**20:6.0f} MiB/s "
              f"({size / durable / disk:4.0%} of the disk)")
    result["blocked_ratio"] = result["trainctl async"]["blocked"] / base
    result["commit_share_of_disk"] = size / result["trainctl async"]["durable"] / disk
    print(f"  targets: blocked <= 10% of plain (got {result['blocked_ratio']:.1%}); commit >= 50% of the disk "
          f"(got {result['commit_share_of_disk']:.0%})")
    shutil.rmtree(args.dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
