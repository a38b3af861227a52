"""Data path: images per CPU-second and peak RSS of trainctl's loader vs timm's training pipeline.

Same photo-sized JPEGs (500–1500 px), same output (224 px, bicubic), same augmentation kinds
(random resized crop with timm's default scale/ratio + horizontal flip + normalisation), one
process, one torch thread each, alternated. The figure that matters is images per CPU-second
("per core"); each variant runs in its own process so its peak RSS is its own.

A further child runs both loaders in one process, a batch of each in turn: the ratio it gives is the
least disturbed by the machine's changing speed (the separate processes' ratio is kept for the RSS and as
a cross-check). Another child measures the floor under both: decoding the whole file with Pillow, at full and at
1/8 DCT scale, per image (the entropy decoding of every block is paid at any scale).

With --recipe both add timm's fine-tuning augmentations (RECIPE: RandAugment rand-m9-mstd0.5-inc1, colour jitter 0.4
(which timm, and so trainctl, leaves off beside RandAugment), random erasing 0.25 in "pixel" mode): trainctl's through
its [augment] section (worker/augment.py; the erasing patches laid on the normalised batch as the training step does),
timm's through create_transform's own arguments (target: >= 1.5x).

    python bench/data_path.py [--images 120] [--batch 16] [--batches N] [--repeats 3] [--passes 3] [--recipe]
                              [--compare-with CHECKOUT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, alternated, machine, photos, run_child  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# timm train.py's flags of the EVA02 fine-tuning recipe (issue 18): --aa, --color-jitter, --reprob, --remode, --recount
RECIPE = {"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "re_prob": 0.25, "re_mode": "pixel",
          "re_count": 1}


def ours_batches(folder: Path, batch: int, recipe: bool = False):
    """trainctl's loader, one micro-batch per `next()`, endlessly (epoch after epoch)."""
    import torch
    try:   # a checkout from before the contract package (--compare-with) scans with its own code
        from trainctl.worker.folders import scan
    except ImportError:
        from trainctl.contract.folders import scan
    from trainctl.worker.data import MicroBatches, train_keys
    from trainctl.worker.images import Recipe
    image_recipe = Recipe(size=224, interpolation="bicubic", mean=MEAN, std=STD)
    augment = {}
    if recipe:
        from trainctl.contract.config import AugmentSection
        from trainctl.worker.augment import erase
        augment = {"augment": AugmentSection(**RECIPE)}
    data = MicroBatches(scan(folder, (".jpg",)), image_recipe, seed=0, batch_size=batch, train=True, **augment)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    keys = train_keys(0, 0, 10**6, len(data.folder) // batch, batch, batch)()
    while True:   # uint8 micro-batch, then float + in-place normalisation and erasing (what the worker does)
        mb = data[next(keys)]
        x = mb.images.float().sub_(mean).div_(std)
        yield erase(x, mb.erased) if recipe else x


def timm_batches(folder: Path, batch: int, recipe: bool = False):
    """timm's training pipeline (ImageDataset + create_transform) in a DataLoader, one batch per `next()`."""
    import timm.data
    import torch
    augment = RECIPE if recipe else {"auto_augment": None, "color_jitter": None, "re_prob": 0.0}
    transform = timm.data.create_transform(224, is_training=True, interpolation="bicubic", hflip=0.5, mean=MEAN,
                                           std=STD, **augment)
    if recipe:   # Pillow 13 refuses timm's posterize to 0 bits: the fix trainctl applies, or this pipeline crashes
        from trainctl.worker.augment import keep_zero_bits
        keep_zero_bits(transform)
    dataset = timm.data.ImageDataset(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    while True:
        for x, _ in loader:
            yield x


LOADERS = {"ours": ours_batches, "timm": timm_batches}


def warmed(which: str, folder: Path, batch: int, recipe: bool = False):
    """A fresh loader, after two batches of another (imports, first-call costs): the timed batches start at an
    epoch's first, so whole passes of both variants decode the same photos."""
    warm_up = LOADERS[which](folder, batch, recipe)
    next(warm_up), next(warm_up)
    return LOADERS[which](folder, batch, recipe)


def decode_floor(folder: Path) -> dict:
    """CPU ms per image to decode whole files (bytes already in memory): full scale and 1/8 scale."""
    import io

    from PIL import Image
    files = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))]
    result = {}
    for name, scale in (("full", 1), ("eighth", 8)):
        cpu = time.process_time()
        for data in files:
            img = Image.open(io.BytesIO(data))
            if scale > 1:
                img.draft("RGB", (img.width // scale, img.height // scale))
            img.load()
        result[name] = (time.process_time() - cpu) / len(files) * 1000
    return result


def child(which: str, folder: Path, batch: int, batches: int, recipe: bool = False) -> None:
    import torch
    torch.set_num_threads(1)
    if which == "floor":
        print(json.dumps(decode_floor(folder)))
        return
    if which == "interleaved":
        print(json.dumps(interleaved(folder, batch, batches, recipe)))
        return
    loader = warmed(which, folder, batch, recipe)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(loader)
    print(json.dumps({"images": batches * batch, "cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}))


def interleaved(folder: Path, batch: int, batches: int, recipe: bool = False) -> dict:
    """Both loaders in one process, batch by batch in turn: CPU seconds per batch of each, so that a change
    in the machine's speed (these machines are shared) lands on both within a fraction of a second."""
    loaders = {name: warmed(name, folder, batch, recipe) for name in LOADERS}
    cpu = {name: [] for name in loaders}
    for i in range(batches):
        for name in (("ours", "timm") if i % 2 else ("timm", "ours")):
            start = time.process_time()
            next(loaders[name])
            cpu[name].append(time.process_time() - start)
    return cpu


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, help="default: the whole folder once, so both decode the same photos")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--passes", type=int, default=3,
                   help="passes over the folder by each loader in the interleaved one-process run")
    p.add_argument("--child", choices=("ours", "timm", "floor", "interleaved"))
    p.add_argument("--folder", type=Path, default=OUT / "photos")
    p.add_argument("--compare-with", type=Path, metavar="CHECKOUT",
                   help="also run the loader of another trainctl checkout (e.g. a `git worktree` of an older commit; "
                        "with --recipe, one that has [augment])")
    p.add_argument("--recipe", action="store_true", help="both loaders with timm's augmentations (RECIPE)")
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.folder, args.batch, args.batches, args.recipe)
        return {}
    folder = photos(args.folder, args.images)
    count = sum(1 for _ in folder.rglob("*.jpg"))
    args.batches = args.batches or count // args.batch
    sizes = ["--batch", str(args.batch), "--batches", str(args.batches)] + (["--recipe"] if args.recipe else [])

    def loader_run(loader: str, pythonpath: str | None = None) -> dict:
        r, rss = _child([loader, "--folder", str(folder), *sizes], pythonpath)
        return {"per_cpu_s": r["images"] / r["cpu"], "per_s": r["images"] / r["wall"], "rss": rss}

    variants = {"ours": lambda: loader_run("ours"), "timm": lambda: loader_run("timm")}
    if args.compare_with:
        other = _import_path(args.compare_with.resolve())
        variants["other"] = lambda: loader_run("ours", other)
    runs = alternated(variants, args.repeats)
    result = {w: {k: statistics.median(x[k] for x in rs) for k in ("per_cpu_s", "per_s", "rss")} for w, rs in runs.items()}
    result["ratio_per_core"] = result["ours"]["per_cpu_s"] / result["timm"]["per_cpu_s"]
    result["ratio_rss"] = result["ours"]["rss"] / result["timm"]["rss"]
    result["decode_ms"] = _child(["floor", "--folder", str(folder)])[0]
    cpu = _child(["interleaved", "--folder", str(folder), "--batch", str(args.batch),
                  "--batches", str(args.passes * args.batches)] + (["--recipe"] if args.recipe else []))[0]
    result["interleaved"] = _interleaved_ratios(cpu, args.passes)
    augmented = f", augmented as {RECIPE}" if args.recipe else ""
    print(f"data path ({machine()}): {args.batches * args.batch} images drawn from {count} photos, 224 px{augmented}, "
          f"median of {args.repeats}")
    for w in variants:
        print(f"  {w:5s} {result[w]['per_cpu_s']:7.1f} images per CPU-second  {result[w]['per_s']:7.1f} images/s  "
              f"peak RSS {result[w]['rss'] / 2**20:6.0f} MiB")
    print(f"  ratio per core: {result['ratio_per_core']:.2f}x (target >= {1.5 if args.recipe else 2.0}), peak RSS ratio: "
          f"{result['ratio_rss']:.2f} (target <= 1.0)")
    for a, b in (("ours", "timm"), ("ours", "other")):
        if b in runs:   # each repeat runs the variants back to back: their ratio cancels slow drifts of the machine
            paired = [x["per_cpu_s"] / y["per_cpu_s"] for x, y in zip(runs[a], runs[b])]
            result[f"paired_{a}_{b}"] = statistics.median(paired)
            print(f"  {a} / {b}, paired per repeat: median {statistics.median(paired):.2f}x, "
                  f"range {min(paired):.2f}-{max(paired):.2f} ({', '.join(f'{x:.2f}' for x in paired)})")
    i = result["interleaved"]
    print(f"  ours / timm, interleaved batch by batch in one process ({args.passes} passes each): "
          f"{i['ratio']:.2f}x; per pass {', '.join(f'{x:.2f}' for x in i['per_pass'])}")
    timm_ms = 1000 / result["timm"]["per_cpu_s"]
    floor = result["decode_ms"]
    print(f"  floor: decoding a whole file costs {floor['full']:.1f} ms at full scale, {floor['eighth']:.1f} ms at 1/8 "
          f"scale; timm's pipeline {timm_ms:.1f} ms and ours {1000 / result['ours']['per_cpu_s']:.1f} ms per image")
    return result


def _child(args: list[str], pythonpath: str | None = None) -> tuple[dict, int]:
    """Run this script as `--child ARGS` (with PYTHONPATH set, if given): its last line, parsed, and its peak RSS."""
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    code, out, rss = run_child([sys.executable, __file__, "--child", *args], env=env)
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1]), rss


def _interleaved_ratios(cpu: dict, passes: int) -> dict:
    """Images per CPU-second of ours over timm's (both drew the same number of images): overall and per pass."""
    n = len(cpu["ours"]) // passes
    per_pass = [sum(cpu["timm"][k * n:(k + 1) * n]) / sum(cpu["ours"][k * n:(k + 1) * n]) for k in range(passes)]
    return {"ratio": sum(cpu["timm"]) / sum(cpu["ours"]), "per_pass": per_pass}


def _import_path(checkout: Path) -> str:
    """A folder in which `import trainctl` finds `checkout` (the repository root is the package)."""
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="trainctl-compare-"))
    (folder / "trainctl").symlink_to(checkout, target_is_directory=True)
    return str(folder)


if __name__ == "__main__":
    main()
