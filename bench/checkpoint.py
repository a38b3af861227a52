"""Checkpoint cost for a ViT-Base-size state (eva02_base_patch14_224 + AdamW, ~1 GB), inside real training.

Side by side, alternated, each right after a real optimizer step (forward + backward over `--accum`
micro-batches of `--batch` random images, then AdamW): a plain synchronous `torch.save` + fsync (what
a training loop usually does); trainctl's synchronous commit (hash, fsync, rename, directory fsync,
marker); trainctl's background commit (the writer reads the live weights while the next step's
forward and backward passes run; the next optimizer update waits until it has read them); and, for
the writer's own speed, the same background write with training waiting for it.

For each: the time the training thread is blocked (for the background write: capture, plus any wait
before the next update), how much longer the next step took than a step with no write in flight (two
cores shared by training and writer; the reference is the median of all steps with no write in flight), the
time until the checkpoint is durable, and the CPU time of the write alone (training waiting). The disk's own
fsync'd sequential write speed (`dd ... conv=fsync`) is the physical limit; the floor of the writer's CPU
is one pass over the state's bytes, a copy plus the CRC-32 (into a reused 1 MiB buffer, no file): measured
alone and on a thread beside a training step, as the background write runs.

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
import threading
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
from trainctl.worker import ckptfile  # noqa: E402
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
    path = folder / f"plain-{t.progress.step}.pt"
    with open(path, "wb") as f:
        torch.save(capture(t), f)
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - started
    path.unlink()   # the disk holds one state-sized file besides the checkpoints
    return {"blocked": took, "durable": took, "next_step": train_step(t, args.batch, args.accum)}


def process_cpu() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    t = os.times()
    return t.user + t.system


def ours(t, folder: Path, args, background: bool, alone: bool = False) -> dict:
    writer = Writer(folder, keep_last=1, on_phase=lambda phase, s: None, background=background)
    started, cpu = time.perf_counter(), process_cpu()
    writer.submit(t.progress.step, capture(t, background), {"epoch": 0},
                  shares_training_memory=background and shares_training_memory(t))
    blocked = time.perf_counter() - started
    waited = []

    def before_update():
        at = time.perf_counter()
        writer.wait_released()
        waited.append(time.perf_counter() - at)
    out = {}
    if alone:   # the writer's own speed: training waits for it (not what the worker does), so all CPU is the write's
        writer.wait()
        out["cpu"] = process_cpu() - cpu
    next_step = train_step(t, args.batch, args.accum, before_update)
    writer.wait()
    return {"blocked": blocked + waited[0], "durable": writer.write_seconds, "next_step": next_step, **out}


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def one_pass(state: dict) -> None:
    """The floor: every byte of the state's tensors copied once (into a reused 1 MiB buffer) and checksummed with
    the writer's CRC-32."""
    crc, buffer = 0, torch.empty(1 << 20, dtype=torch.uint8).numpy()
    for tensor in tensors(state):
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        for at in range(0, len(data), len(buffer)):
            piece = data[at:at + len(buffer)]
            buffer[:len(piece)] = piece
            crc = ckptfile.crc32(buffer[:len(piece)], crc)


def floor(t, args, beside: bool) -> dict:
    """The floor alone (training waits), or on a thread beside the next step, which waits for it before its
    update (as for the background write)."""
    state = capture(t, background=True)
    out = {}

    def run():
        at = time.perf_counter()
        one_pass(state)
        out["durable"] = time.perf_counter() - at
    cpu = process_cpu()
    thread = threading.Thread(target=run)
    thread.start()
    if not beside:
        thread.join()
        out["cpu"] = process_cpu() - cpu
    next_step = train_step(t, args.batch, args.accum, before_update=thread.join)
    return {"blocked": 0.0, "next_step": next_step, **out}


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
            ckptfile.ChecksumWriter.DIRECT = False   # early writeback matters to page-cache writes only
            ckptfile.ChecksumWriter.WRITEBACK_BYTES = mib << 20
            started = time.perf_counter()
            checkpointlib.save(folder, r, capture(t), 1, {})
            times[mib].append(time.perf_counter() - started)
    disk = statistics.median(speeds)
    print(f"early writeback sweep (page-cache writes, no O_DIRECT), {size / 2**30:.2f} GiB, median of {repeats} "
          f"({machine()}); "
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
            "background writer alone": [], "floor: copy + CRC-32": [], "floor beside training": []}
    speeds, steps = [], []
    for r in range(args.repeats):
        speeds.append(disk_speed(args.dir, max(256, size // 2**20)))
        steps.append(train_step(t, args.batch, args.accum))   # no write in flight: the reference step
        runs["plain torch.save + fsync"].append(plain_save(t, args.dir, args))
        runs["trainctl sync"].append(ours(t, args.dir, args, background=False))
        runs["trainctl background"].append(ours(t, args.dir, args, background=True))
        runs["background writer alone"].append(ours(t, args.dir, args, background=True, alone=True))
        runs["floor: copy + CRC-32"].append(floor(t, args, beside=False))
        runs["floor beside training"].append(floor(t, args, beside=True))
        steps.append(train_step(t, args.batch, args.accum))   # and another, after the writes
    # Every step that ran with no write in flight is a reference: the two above and the steps after the writes that
    # training waited for (plain, sync, the writer alone, the floor alone); one step alone is too noisy a reference.
    steps += [r["next_step"] for name in ("plain torch.save + fsync", "trainctl sync", "background writer alone",
                                          "floor: copy + CRC-32") for r in runs[name]]
    disk, step = statistics.median(speeds), statistics.median(steps)
    result = {"state_bytes": size, "disk_bytes_per_s": disk, "step_seconds": step, "crc32": ckptfile.CRC32_BY,
              "direct": ckptfile.ChecksumWriter.DIRECT}
    print(f"checkpoint of {args.model} + AdamW state on {args.device}: {size / 2**30:.2f} GiB ({machine()}), "
          f"median of {args.repeats}; a step = {args.accum} x batch {args.batch}, {step:.2f} s with no write in flight "
          f"(median of {len(steps)}); disk fsync'd write (dd conv=fsync): {disk / 2**20:.0f} MiB/s; CRC-32 by "
          f"{ckptfile.CRC32_BY}, O_DIRECT {'on' if ckptfile.ChecksumWriter.DIRECT else 'off'}")
    base = statistics.median(r["blocked"] for r in runs["plain torch.save + fsync"])
    for name, rs in runs.items():
        m = {k: statistics.median(r[k] for r in rs) for k in ("blocked", "durable", "next_step")}
        m["slowdown"] = m["next_step"] - step
        cpu = [r["cpu"] for r in rs if "cpu" in r]
        m["cpu"] = statistics.median(cpu) if cpu else None
        result[name] = m
        print(f"  {name:26s} blocked {m['blocked']:6.2f} s ({m['blocked'] / base:6.1%} of plain)   next step "
              f"{m['slowdown']:+5.2f} s ({m['slowdown'] / base:6.1%} of plain)   "
              + (f"cpu {m['cpu']:5.2f} s   " if m["cpu"] is not None else " " * 14)
              + f"done after {m['durable']:6.2f} s"
              + ("" if name.startswith("floor") else f"   commit throughput {size / m['durable'] / 2**20:6.0f} MiB/s "
                                                       f"({size / m['durable'] / disk:4.0%} of the disk)"))
    result["blocked_ratio"] = result["trainctl background"]["blocked"] / base
    result["slowdown_ratio"] = result["trainctl background"]["slowdown"] / base
    result["floor_ratio"] = result["floor beside training"]["slowdown"] / base
    result["commit_share_of_disk"] = size / result["trainctl background"]["durable"] / disk
    result["sync_commit_share_of_disk"] = size / result["trainctl sync"]["durable"] / disk
    result["alone_commit_share_of_disk"] = size / result["background writer alone"]["durable"] / disk
    print(f"  targets: blocked <= 10% of plain (got {result['blocked_ratio']:.1%}); the step beside the background "
          f"write slowed by <= 25% of plain (got {result['slowdown_ratio']:.1%}; the floor beside a step: "
          f"{result['floor_ratio']:.1%}, its CPU {result['floor: copy + CRC-32']['cpu']:.2f} s vs the writer's "
          f"{result['background writer alone']['cpu']:.2f} s); commit >= 50% of the disk (writer alone "
          f"{result['alone_commit_share_of_disk']:.0%}, sync {result['sync_commit_share_of_disk']:.0%}; "
          f"{result['commit_share_of_disk']:.0%} beside training)")
    shutil.rmtree(args.dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
