"""Peak RSS of the worker training an EVA02-Base-size model on the CPU vs a plain loop on timm's pipeline.

Batch 1 and 2 (accumulation 1), a few steps on photo-sized JPEGs at 224 px, same threads; each in
its own process, peak RSS from the kernel (wait4). The data path must not be what runs out of memory.
The worker's epoch-end checkpoint is included, written both ways (`async_write` true and false);
on the CPU neither copies the model and optimizer state.

    python bench/peak_rss.py [--model eva02_base_patch14_224] [--steps 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, frozen_run, machine, photos, run_child, subset  # noqa: E402

from trainctl.supervisor.demo_data import small_config


def config(root: Path, model: str, data: Path, batch: int, async_write: bool) -> str:
    """One CPU rung of `batch` (accumulation 1) over `data`, one epoch; checkpoints only at the epoch's end."""
    return small_config(
        f"rss-{batch}", data,
        run={"runs_dir": str(root / f"runs-{str(async_write).lower()}")},
        model={"name": model, "img_size": None},
        data={"crop_scale": None},
        train={"epochs": 1, "effective_batch_size": batch, "lr": 1e-4, "threads": 2},
        checkpoint={"every_steps": 0, "every_seconds": 0, "async_write": async_write},
        profiles=[{"device": "cpu", "batch_size": batch}])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="eva02_base_patch14_224")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    folder = photos(OUT / "photos", 120)
    throughput = str(Path(__file__).resolve().parent / "throughput.py")
    result = {}
    for batch in (1, 2):
        root = Path(tempfile.mkdtemp(prefix="trainctl-rss-"))
        data = subset(folder, args.steps * batch)
        result[batch] = {}
        for async_write in (False, True):
            run_dir = frozen_run(root / f"run-{str(async_write).lower()}.toml",
                                 config(root, args.model, data, batch, async_write))
            code, out, peak = run_child([sys.executable, "-m", "trainctl.worker", "--run-dir", str(run_dir)])
            assert code == 0, out
            result[batch][f"trainctl async_write={str(async_write).lower()}"] = peak
        code, out, plain = run_child([sys.executable, throughput, "--child", str(folder), "--model", args.model, "--batch",
                                      str(batch), "--steps", str(args.steps + 4), "--threads", "2"])
        assert code == 0, out
        result[batch]["plain timm loop"] = plain
    print(f"peak RSS training {args.model} on the CPU ({machine()}):")
    for batch, r in result.items():
        base = r["plain timm loop"]
        print(f"  batch {batch}: " + ", ".join(f"{k} {v / 2**30:.2f} GiB ({v / base:.2f}x)" for k, v in r.items()))
    return result


if __name__ == "__main__":
    main()
