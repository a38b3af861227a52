"""Accuracy against timm's own train.py: one fine-tuning recipe run by both tools on a real labelled photo set, several
seeds each, alternated; the final (and best) validation top-1 of the raw model and of its EMA, mean and spread.

The question: does a user who moves timm's recipe (layer decay, drop path, EMA, RandAugment, random erasing,
Mixup/CutMix, label smoothing) to trainctl lose accuracy? Speed is bench/timm_peer.py's business; this bench uses
its pieces (the shared CPU lock, the supervisor run of bench/common.py) and only reads accuracies.

The data: `--data DIR`, a folder with train/ and val/ ImageFolders of real photos. The one used for bench/RESULTS.md
is the PyTorch transfer-learning tutorial's hymenoptera set (ants vs bees: 245 train / 153 val JPEG photos,
https://download.pytorch.org/tutorial/hymenoptera_data.zip; offline, e.g. from any git repository that holds it:
`git --git-dir=<clone> archive HEAD hymenoptera_data | tar -x -C DIR`, then --data DIR/hymenoptera_data).
No weights can be downloaded here, so the model trains from scratch: a small CNN at a reduced size (`--model`,
`--img-size`; a convolutional net, because train.py does not pass --img-size to the model, trainctl does).

The peer is timm's `train.py` from its public repository (not vendored: `git --git-dir=<clone of
huggingface/pytorch-image-models> show HEAD:train.py > /tmp/timm_train.py`, then --timm-train /tmp/timm_train.py).
It runs unchanged through a small wrapper (WRAPPER) that does two things before calling its main():
- it points the posterize entries of `timm.data.auto_augment.NAME_TO_OP` at trainctl.worker.augment.posterize, which
  trainctl's own RandAugment uses: timm asks Pillow for 0 bits (PosterizeIncreasing at magnitude 10, ~2% of
  rand-m9-mstd0.5-inc1's draws); Pillow 13 raises there (older Pillow gave a black image, as the wrapper's op does),
  which would crash train.py's loader within the first epochs;
- it records what train.py's validate() returns at each call, the raw model's and the EMA's (log_suffix ' (EMA)'):
  with --model-ema, train.py replaces eval_metrics by the EMA's before writing summary.csv, so summary.csv holds the
  EMA's top-1 only. The bench checks that summary.csv's last eval_top1 is the recorded EMA's.

The recipe is one table (RECIPE: train.py flag ↔ trainctl [section] key, one value for both): AdamW, weight decay
0.05 (timm's create_optimizer_v2: no decay on biases and norms, in both), layer decay 0.65, cosine schedule per
optimizer step after a linear warmup from 1e-5, min lr 0, drop path 0.1, EMA (timm's ModelEmaV3 with warmup, updated
every optimizer step), rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel mode, 1 patch), Mixup 0.8 / CutMix 1.0
(switch 0.5, batch mode) with label smoothing 0.1 in the soft targets, random-resized crop (0.08–1, 3/4–4/3) and flip
0.5 at the model's interpolation, no colour jitter (timm turns it off under auto_augment anyway), batch 16, fp32 on
the CPU at torch's default thread count, validation on val/ at every epoch end (the model's eval resize and centre
crop), the same loader process count. Both drop the last partial batch of an epoch (245 // 16 = 15 steps).

What still differs between the two runs (neither is a recipe setting):
- the random draws. timm: global generators seeded once from --seed (loader processes from their worker seed),
  so an epoch's order, crops, RandAugment ops, erasing and Mixup λ come from one stream. trainctl: every draw a
  function of (seed, epoch, sample index) or (seed, step) (its exact-resume promise). Same distributions, other
  samples: a seed of one tool is not the same run as that seed of the other, hence several seeds and the spread.
  (The initial weights are the same: both seed torch with the seed right before timm.create_model with the same
  arguments; checked equal for resnet10t at seeds 42 and 43.)
- Mixup pairing: timm mixes position i with B-1-i of the loader's batch; trainctl mixes position i with E-1-i of the
  effective batch with λ drawn per (seed, epoch, step). At batch = effective batch (16 here) the pairing is the same.
- the training crops' pixels: trainctl decodes each training JPEG only down to the crop at a reduced DCT scale (its
  fast data path) and resizes the crop with torch's antialiased uint8 kernel (x86); timm decodes the whole image
  with PIL and crops and resizes it with PIL (torchvision's RandomResizedCrop). Same crop box distribution, pixels
  a few levels apart. The validation images are decoded whole in both, trainctl's eval transform is timm's pixel for
  pixel (worker/images.py load_eval), and both apply RandAugment to the resized crop, then erasing after
  normalisation, in timm's order.
- trainctl uses torch's deterministic algorithms; timm does not (on the CPU this changes little).
- the validation loss (trainctl's includes label smoothing; timm's validation loss is plain cross-entropy): not
  compared here, top-1 only.

    python bench/accuracy_peer.py --timm-train /tmp/timm_train.py --data DIR [--seeds 42,43,44] [--epochs 40]
        [--model resnet10t] [--img-size 112] [--lr 2e-3] [--lock FILE] [--json FILE]

trainctl is whichever `import trainctl` finds: to measure the landed code beside a working tree in flux, extract it
(`git archive HEAD`, laid out as trainctl/{contract,supervisor,worker}) and put it first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import frozen_run, machine, rotated, run_supervised, timm_train_run  # noqa: E402
from timm_peer import TOOLS, locked  # noqa: E402

# Runs timm's train.py unchanged (see the docstring): posterize at 0 bits as trainctl does it, and every validate()
# result recorded (raw and EMA) into $ACC_PEER_SCORES at exit.
WRAPPER = """
import atexit, json, os, runpy, sys
from timm.data import auto_augment
from trainctl.worker.augment import posterize
for name, op in list(auto_augment.NAME_TO_OP.items()):
    if op is auto_augment.posterize:
        auto_augment.NAME_TO_OP[name] = posterize
scores = []
def save():
    with open(os.environ["ACC_PEER_SCORES"], "w") as f:
        json.dump(scores, f)
atexit.register(save)
sys.argv = sys.argv[1:]
train = runpy.run_path(sys.argv[0], run_name="timm_train")
def validate(*args, log_suffix="", **kwargs):
    metrics = train["validate"](*args, log_suffix=log_suffix, **kwargs)
    scores.append({"ema": bool(log_suffix), **metrics})
    return metrics
train["main"].__globals__["validate"] = validate
train["main"]()
"""


def recipe(args, seed: int) -> list[tuple[str, str, str, object]]:
    """The recipe, one value for both tools: (train.py flag, trainctl section, trainctl key, value)."""
    return [
        ("--model", "model", "name", args.model),
        ("--img-size", "model", "img_size", args.img_size),
        ("--drop-path", "model", "drop_path_rate", 0.1),
        ("--drop", "model", "drop_rate", 0.0),
        ("--seed", "run", "seed", seed),
        ("--epochs", "train", "epochs", args.epochs),
        ("--batch-size", "train", "effective_batch_size", args.batch),
        ("--opt", "train", "opt", "adamw"),
        ("--lr", "train", "lr", args.lr),
        ("--weight-decay", "train", "weight_decay", 0.05),
        ("--layer-decay", "train", "layer_decay", 0.65),
        ("--sched", "train", "sched", "cosine"),
        ("--warmup-epochs", "train", "warmup_epochs", args.warmup_epochs),
        ("--warmup-lr", "train", "warmup_lr", 1e-5),
        ("--min-lr", "train", "min_lr", 0.0),
        ("--smoothing", "train", "label_smoothing", 0.1),
        ("--model-ema", "ema", "enabled", True),
        ("--model-ema-decay", "ema", "decay", args.ema_decay),
        ("--model-ema-warmup", "ema", "warmup", True),
        ("--scale", "data", "crop_scale", [0.08, 1.0]),
        ("--ratio", "data", "crop_ratio", [3 / 4, 4 / 3]),
        ("--hflip", "data", "hflip", 0.5),
        ("--aa", "augment", "auto_augment", "rand-m9-mstd0.5-inc1"),
        ("--color-jitter", "augment", "color_jitter", 0.0),
        ("--reprob", "augment", "re_prob", 0.25),
        ("--remode", "augment", "re_mode", "pixel"),
        ("--recount", "augment", "re_count", 1),
        ("--mixup", "augment", "mixup_alpha", 0.8),
        ("--cutmix", "augment", "cutmix_alpha", 1.0),
        ("--mixup-prob", "augment", "mixup_prob", 1.0),
        ("--mixup-switch-prob", "augment", "mixup_switch_prob", 0.5),
        ("--mixup-mode", "augment", "mixup_mode", "batch"),
    ]


@dataclass(frozen=True)
class Run:
    """One tool's run at one seed: validation top-1 (a share, 0–1) of the raw model and of the EMA, per epoch."""
    tool: str
    seed: int
    raw: tuple[float, ...]
    ema: tuple[float, ...]
    wall: float

    def as_dict(self) -> dict:
        return {"tool": self.tool, "seed": self.seed, "raw": list(self.raw), "ema": list(self.ema), "wall": self.wall}


# ---- timm's train.py ---------------------------------------------------------------------------------------------
def timm_flags(args, seed: int, classes: int) -> list[str]:
    """train.py's command line: the recipe, and what only train.py needs said (the CPU, no CUDA prefetcher, the
    schedule stepped per optimizer step as trainctl always does, the model's own interpolation as trainctl uses)."""
    flags = [str(args.data), "--train-split", "train", "--val-split", "val", "--num-classes", str(classes),
             "--workers", str(args.workers), "--device", "cpu", "--no-prefetcher", "--sched-on-updates",
             "--train-interpolation", "", "--checkpoint-hist", "1"]
    for flag, _, _, value in recipe(args, seed):
        if value is True:
            flags.append(flag)
        elif isinstance(value, list):
            flags += [flag, *(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags


def timm_run(args, seed: int, classes: int) -> Run:
    """One run of train.py through WRAPPER in a scratch folder; raw and EMA top-1 per epoch from its record."""
    with timm_train_run(WRAPPER, args.timm_train, timm_flags(args, seed, classes), args.scratch, "ACC_PEER_SCORES",
                        args.keep, f" (seed {seed})") as (work, scores, started, ended):
        raw, ema = timm_scores(scores, args.epochs)
        check_summary(work / "run" / "summary.csv", ema[-1])
    return Run(TOOLS[0], seed, raw, ema, ended - started)


def timm_scores(scores: list[dict], epochs: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(raw, EMA) top-1 shares per epoch from the recorded validate() calls: per epoch the raw model's, then the EMA's."""
    kinds = [s["ema"] for s in scores]
    if kinds != [False, True] * epochs:
        raise RuntimeError(f"timm train.py: expected {epochs} epochs of (raw, EMA) validations, got "
                           f"{len(scores)} ({kinds[:6]}...)")
    return (tuple(s["top1"] / 100 for s in scores if not s["ema"]),   # timm's top-1 is a percentage
            tuple(s["top1"] / 100 for s in scores if s["ema"]))


def check_summary(path: Path, ema_final: float) -> None:
    """summary.csv's last eval_top1 must be the EMA's (train.py's replacement): else the record is not what it seems."""
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    if not rows or "eval_top1" not in rows[-1]:
        raise RuntimeError(f"timm train.py: no eval_top1 in {path}")
    if abs(float(rows[-1]["eval_top1"]) / 100 - ema_final) > 1e-6:
        raise RuntimeError(f"timm train.py: summary.csv's last eval_top1 {rows[-1]['eval_top1']} is not the recorded "
                           f"EMA top-1 {ema_final * 100:.4f}: train.py's validation changed, update WRAPPER")


# ---- trainctl ----------------------------------------------------------------------------------------------------
def trainctl_config(args, seed: int, root: Path) -> str:
    """The recipe as a trainctl config (the demo's small run, its sections replaced by the recipe's keys)."""
    from trainctl.supervisor.demo_data import small_config
    sections: dict[str, dict] = {"run": {"runs_dir": str(root / "runs")}, "train": {"threads": None},   # torch's default
                                 "supervisor": {"keep_awake": False}}
    for _, section, key, value in recipe(args, seed):
        sections.setdefault(section, {})[key] = value
    return small_config(f"acc-{seed}", args.data / "train", args.data / "val", **sections,
                        profiles=[{"device": "cpu", "batch_size": args.batch, "num_workers": args.workers}])


def trainctl_run(args, seed: int, classes: int) -> Run:
    """One supervised run on a frozen config; raw and EMA top-1 per epoch from its metrics.jsonl."""
    from trainctl.contract.runfolder import read_metrics
    root = Path(tempfile.mkdtemp(prefix="trainctl-acc-", dir=args.scratch))
    try:
        run_dir = frozen_run(root / "run.toml", trainctl_config(args, seed, root))
        started, ended = run_supervised(run_dir)
        raw, ema = trainctl_scores(read_metrics(run_dir), args.epochs)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return Run(TOOLS[1], seed, raw, ema, ended - started)


def trainctl_scores(records: list[dict], epochs: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(raw, EMA) top-1 per epoch from metrics.jsonl's "val" lines (an epoch's newest line, as the report reads it)."""
    val = {r["epoch"]: r for r in records if r.get("kind") == "val" and isinstance(r.get("epoch"), int)}
    missing = [e for e in range(1, epochs + 1) if not _finite(val.get(e, {}).get("val_acc"))
               or not _finite(val.get(e, {}).get("ema_val_acc"))]
    if missing:
        raise RuntimeError(f"trainctl: no val_acc / ema_val_acc in metrics.jsonl for epochs {missing}")
    return (tuple(val[e]["val_acc"] for e in range(1, epochs + 1)),
            tuple(val[e]["ema_val_acc"] for e in range(1, epochs + 1)))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ---- the report --------------------------------------------------------------------------------------------------
def majority_share(val_dir: Path) -> float:
    """The share of the largest class among the validation images: what always guessing it scores."""
    counts = [sum(1 for f in d.iterdir() if f.is_file()) for d in val_dir.iterdir() if d.is_dir()]
    return max(counts) / sum(counts)


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 with one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "each": values}


def summary(runs: dict[str, list[Run]]) -> dict:
    """Per tool and figure (final / best epoch, raw / EMA): mean and spread over the seeds; trainctl − timm."""
    pick = {"final_raw": lambda r: r.raw[-1], "final_ema": lambda r: r.ema[-1],
            "best_raw": lambda r: max(r.raw), "best_ema": lambda r: max(r.ema)}
    out = {tool: {k: spread([f(r) for r in rs]) for k, f in pick.items()} for tool, rs in runs.items()}
    out["difference"] = {k: out[TOOLS[1]][k]["mean"] - out[TOOLS[0]][k]["mean"] for k in pick}
    return out


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def table(runs: dict[str, list[Run]], s: dict) -> str:
    """The Markdown table: per seed the final (best-epoch) top-1 of raw and EMA per tool, then mean ± std, then
    the difference of the means."""
    head = "| seed | " + " | ".join(f"{t} raw | {t} EMA" for t in TOOLS) + " |"
    lines = [head, "|---" + "|---:" * 2 * len(TOOLS) + "|"]
    for i, seed in enumerate(r.seed for r in runs[TOOLS[0]]):
        cells = []
        for tool in TOOLS:
            r = runs[tool][i]
            cells += [f"{pct(r.raw[-1])} ({pct(max(r.raw))})", f"{pct(r.ema[-1])} ({pct(max(r.ema))})"]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    for what in ("final", "best"):
        cells = [f"{pct(s[t][f'{what}_{m}']['mean'])} ± {pct(s[t][f'{what}_{m}']['std'])}" for t in TOOLS
                 for m in ("raw", "ema")]
        lines.append(f"| {what} epoch, mean ± std | " + " | ".join(cells) + " |")
    d = s["difference"]
    lines.append(f"| trainctl − timm, means (final; best) | | | {d['final_raw'] * 100:+.1f}; {d['best_raw'] * 100:+.1f} "
                 f"| {d['final_ema'] * 100:+.1f}; {d['best_ema'] * 100:+.1f} |")
    return "\n".join(lines)


def classes_of(data: Path) -> int:
    """The class count of train/ (the folders in it), checked against val/'s."""
    train, val = ({d.name for d in (data / split).iterdir() if d.is_dir()} for split in ("train", "val"))
    if not train or train != val:
        raise SystemExit(f"--data {data}: train/ and val/ must hold the same class folders (got {sorted(train)} "
                         f"and {sorted(val)})")
    return len(train)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (from its repository)")
    p.add_argument("--data", type=Path, required=True, help="a folder with train/ and val/ ImageFolders")
    p.add_argument("--seeds", default="42,43,44", help="comma-separated; each tool runs once per seed")
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=16, help="even (Mixup pairs); also the effective batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-epochs", type=int, default=3, help="whole epochs (train.py takes an int)")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--workers", type=int, default=2, help="loader processes, both tools")
    p.add_argument("--scratch", type=Path, default=None, help="where the runs' folders go (deleted after each)")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders")
    p.add_argument("--lock", type=Path, help="flock this file around each seed's pair of runs (a shared machine)")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    args.timm_train, args.data = args.timm_train.resolve(), args.data.resolve()
    if not args.timm_train.is_file():
        raise SystemExit(f"--timm-train {args.timm_train}: no such file")
    if args.batch % 2:
        raise SystemExit(f"--batch {args.batch}: must be even (Mixup mixes pairs)")
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    classes = classes_of(args.data)
    tools = {TOOLS[0]: timm_run, TOOLS[1]: trainctl_run}
    runs: dict[str, list[Run]] = {t: [] for t in TOOLS}
    for i, seed in enumerate(seeds):
        with locked(args.lock):
            for tool in rotated(list(TOOLS), i):
                r = tools[tool](args, seed, classes)
                runs[tool].append(r)
                print(f"  seed {seed}: {tool:14s} final top-1 raw {pct(r.raw[-1])} EMA {pct(r.ema[-1])}, best raw "
                      f"{pct(max(r.raw))} EMA {pct(max(r.ema))} ({r.wall:.0f} s)", flush=True)
    import trainctl   # PYTHONPATH may point at another copy (e.g. a `git archive` of the landed code)
    s = summary(runs)
    result = {"machine": machine(), "trainctl": str(Path(trainctl.__file__).parent),
              "args": {k: str(v) for k, v in vars(args).items()}, "majority_share": majority_share(args.data / "val"),
              "summary": s, "runs": [r.as_dict() for rs in runs.values() for r in rs]}
    print(f"\n{args.model} from scratch at {args.img_size} px, {args.epochs} epochs, batch {args.batch}, "
          f"{args.workers} loader processes, CPU ({result['machine']}); data {args.data} ({classes} classes; "
          f"always guessing the largest class scores {pct(result['majority_share'])}%); trainctl {result['trainctl']}")
    print("validation top-1 (%), final epoch (best epoch):")
    print(table(runs, s))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
