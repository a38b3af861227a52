"""Peak memory of each addition of issue 18's fine-tuning recipe, trainctl's worker vs a plain timm loop.

EVA02-Base (`eva02_base_patch14_224`, pretrained=False, 1000 classes) on the CPU, 2 torch threads, micro-batch 1 and 2
with accumulation 2 (effective batch 2 and 4), `--steps` optimizer steps over photo-sized JPEGs (bench/common.photos,
500–1500 px): 1000 class folders holding one photo each (links), read by both. Configurations: the plain recipe
trainctl had before issue 18 (AdamW lr 1e-4, weight decay 0.05, random-resized crop + flip, cross-entropy), that
recipe plus one addition (ADDITIONS), and the whole recipe at once. One fresh process per configuration and side,
since peak RSS only grows; peak RSS from the kernel (getrusage's ru_maxrss), no loader processes (num_workers 0).

- trainctl: the real worker, in process: `trainctl.worker.main.main(["--run-dir", ...])` on a frozen run folder,
  its config keys as a user writes them ([model] drop_path_rate/drop_rate, [train] layer_decay/label_smoothing,
  [ema], [augment]); its own data path (JPEG decoded down to the crop), sanity check and loop. The one change: after
  `--steps` optimizer steps the loop is asked to stop as SIGTERM asks it (Trainer._step wrapped), so it writes its
  stop checkpoint and exits "stopped". Two readings: the peak once the steps are done (`steps`: what the timm loop
  is compared with) and at exit (`+ stop ckpt`: the checkpoint write included).
- timm loop: what a user writes with timm alone and the same recipe: `timm.create_model(drop_path_rate=...,
  drop_rate=...)`, `create_optimizer_v2(layer_decay=...)`, `create_transform(is_training=True, auto_augment=...,
  re_prob=...)` over the same folder with a torch DataLoader, `timm.utils.ModelEmaV3` (device "cpu" for [ema]
  device = "cpu"), `timm.data.Mixup` + `SoftTargetCrossEntropy`. It loads the effective batch and cuts it into
  micro-batches for the accumulation: timm's Mixup asserts an even batch, so at micro-batch 1 the effective batch is
  the only thing it can mix.

The peaks depend on glibc's allocator as much as on what is alive: by default its mmap threshold rises to the size
of the largest block freed so far (up to 32 MiB), after which activations and gradients come from the heap and what is
freed is not always handed back, so a peak can sit 150–200 MiB above the live high-water mark, by chance of
allocation order (up to ~100 MiB apart between configurations that allocate the same). A fixed threshold
(`MALLOC_MMAP_THRESHOLD_=131072`, glibc's initial value) maps every large tensor on its own and unmaps it when freed:
the peak is then what is alive, and the differences are the additions' own.

    cd /work/main && flock /tmp/h22/cpu.lock .venv/bin/python bench/recipe_memory.py [--steps 3] [--batches 1,2]
        [--configs base,ema_same,ema_cpu,...] [--sides trainctl,timm] [--model eva02_base_patch14_224] [--json FILE]
    MALLOC_MMAP_THRESHOLD_=131072 flock /tmp/h22/cpu.lock .venv/bin/python bench/recipe_memory.py   # live memory

trainctl is whichever `import trainctl` finds: to measure the landed code beside a working tree in flux, extract it
(`git archive HEAD`, laid out as trainctl/{contract,supervisor,worker}) and put it first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, frozen_run, machine, photos, run_child  # noqa: E402

from trainctl.contract.protocol import ExitCode  # noqa: E402 (no torch: the parent never imports it)

MODEL = "eva02_base_patch14_224"
CLASSES = 1000
THREADS = 2
ACCUM = 2
LR = 1e-4
EMA_DECAY = 0.9998   # [ema] decay's default (timm train.py's --model-ema-decay)
RESULT = "RESULT "   # the child's last line: RESULT {json}

RANDAUG = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}   # --aa rand-m9-mstd0.5-inc1 --reprob 0.25
MIXUP = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}                     # --mixup 0.8 --cutmix 1.0 (with --smoothing 0.1)
# Each configuration: the base recipe plus these config sections of trainctl's; the timm loop reads the same values.
ADDITIONS = {
    "base": {},
    "layer_decay": {"train": {"layer_decay": 0.65}},
    "drop_path": {"model": {"drop_path_rate": 0.1, "drop_rate": 0.1}},
    "ema_same": {"ema": {"enabled": True, "device": "same"}},
    "ema_cpu": {"ema": {"enabled": True, "device": "cpu"}},
    "randaug_erasing": {"augment": RANDAUG},
    "mixup_cutmix": {"augment": MIXUP, "train": {"label_smoothing": 0.1}},
    "whole": {"model": {"drop_path_rate": 0.1, "drop_rate": 0.1}, "train": {"layer_decay": 0.65, "label_smoothing": 0.1},
              "ema": {"enabled": True, "device": "cpu"}, "augment": {**RANDAUG, **MIXUP}},
}
SIDES = ("trainctl", "timm")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def report(marks: dict) -> None:
    """The child's result as its last line; then leave without torch's teardown (as the worker's __main__ does)."""
    print(RESULT + json.dumps(marks), flush=True)
    sys.stderr.flush()
    os._exit(0)


# ---- the children: one configuration, one side, one process ----------------------------------------------------

def trainctl_child(run_dir: Path, steps: int) -> None:
    """The real worker on `run_dir`, asked to stop (as by SIGTERM) once `steps` optimizer steps are done."""
    from trainctl.worker.main import main as worker_main
    from trainctl.worker.train import Trainer   # torch, timm and the worker's modules
    marks, take_step, started = {"imports_mib": peak_mib()}, Trainer._step, time.monotonic()

    def marked(method, mark: str):
        def run(self, *args):
            result = method(self, *args)
            marks[mark] = peak_mib()
            return result
        return run

    def step_then_stop(self, batches):
        result = take_step(self, batches)
        if self.progress.step + 1 >= steps:   # the loop counts this step once _step returns
            marks.update(steps_mib=peak_mib(), seconds=time.monotonic() - started)
            self.flags.stop, self.flags.stop_reason = True, f"bench: {steps} steps done"
        return result

    Trainer._step = step_then_stop
    Trainer.setup = marked(Trainer.setup, "setup_mib")   # the model, EMA, optimizer, data built
    Trainer.sanity_check = marked(Trainer.sanity_check, "sanity_mib")
    code = worker_main(["--run-dir", str(run_dir)])
    report({**marks, "exit": int(code), "end_mib": peak_mib()})


def timm_child(name: str, model_name: str, folder: Path, batch: int, steps: int) -> None:
    """The same recipe in a plain timm loop (accumulation ACCUM over the effective batch)."""
    import timm
    import timm.data
    import timm.optim
    import torch
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3
    marks, started = {"imports_mib": peak_mib()}, time.monotonic()
    model_keys, ema_keys, train, augment = (ADDITIONS[name].get(k, {}) for k in ("model", "ema", "train", "augment"))
    torch.set_num_threads(THREADS)
    torch.manual_seed(42)
    model = timm.create_model(model_name, pretrained=False, num_classes=CLASSES,
                              **{k: v for k, v in model_keys.items() if v})
    ema = None
    if ema_keys.get("enabled"):   # timm train.py's --model-ema [--model-ema-force-cpu]
        ema = ModelEmaV3(model, decay=EMA_DECAY, device=torch.device("cpu") if ema_keys["device"] == "cpu" else None)
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=LR, weight_decay=0.05,
                                               layer_decay=train.get("layer_decay"))
    smoothing = train.get("label_smoothing", 0.0)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model), is_training=True,
                                           color_jitter=None, auto_augment=augment.get("auto_augment"),
                                           re_prob=augment.get("re_prob", 0.0), re_mode="pixel", re_count=1)
    loader = torch.utils.data.DataLoader(timm.data.ImageDataset(str(folder), transform=transform),
                                         batch_size=batch * ACCUM, shuffle=True, drop_last=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(42))
    mixup = None
    if augment.get("mixup_alpha") or augment.get("cutmix_alpha"):
        mixup = timm.data.Mixup(mixup_alpha=augment.get("mixup_alpha", 0.0), cutmix_alpha=augment.get("cutmix_alpha", 0.0),
                                label_smoothing=smoothing, num_classes=CLASSES)
    loss_fn = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    model.train()
    marks["setup_mib"] = peak_mib()
    for step, (x, y) in zip(range(1, steps + 1), loader):
        if mixup is not None:
            x, y = mixup(x, y)
        for xb, yb in zip(x.split(batch), y.split(batch)):
            (loss_fn(model(xb), yb) / ACCUM).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step=step)
    report({**marks, "steps_mib": peak_mib(), "seconds": time.monotonic() - started, "end_mib": peak_mib()})


# ---- the parent: data, run folders, one child per cell, the tables ----------------------------------------------

def class_folders(root: Path, source: Path, count: int) -> Path:
    """`count` class folders under `root`, each holding a link to one photo of `source` (photos reused in turn)."""
    shots = sorted(source.rglob("*.jpg"))
    for i in range(count):
        (root / f"class{i:04d}").mkdir(parents=True)
        (root / f"class{i:04d}" / shots[i % len(shots)].name).symlink_to(shots[i % len(shots)])
    return root


def trainctl_config(root: Path, name: str, model: str, data: Path, batch: int) -> str:
    """The run of configuration `name`: the base recipe on one CPU rung of `batch` x ACCUM, no scheduled checkpoints."""
    from trainctl.supervisor.demo_data import small_config
    sections = {"run": {"runs_dir": str(root / "runs"), "seed": 42},
                "model": {"name": model, "img_size": None},
                "data": {"crop_scale": None},   # the default (0.08, 1.0), as timm's
                "train": {"epochs": 1, "effective_batch_size": batch * ACCUM, "lr": LR, "threads": THREADS},
                "checkpoint": {"every_steps": 0, "every_seconds": 0}}
    for section, keys in ADDITIONS[name].items():
        sections[section] = {**sections.get(section, {}), **keys}
    return small_config(f"{name}-b{batch}", data, profiles=[{"device": "cpu", "batch_size": batch}], **sections)


def measure(side: str, name: str, batch: int, args, data: Path, root: Path) -> dict:
    """One cell in its own process: the child's readings (MiB) and the process's peak from wait4."""
    me = str(Path(__file__).resolve())
    if side == "trainctl":
        run_dir = frozen_run(root / f"{name}-b{batch}.toml", trainctl_config(root, name, args.model, data, batch))
        cmd = [sys.executable, me, "--child-trainctl", str(run_dir), "--steps", str(args.steps)]
    else:
        cmd = [sys.executable, me, "--child-timm", name, "--model", args.model, "--data", str(data),
               "--batch", str(batch), "--steps", str(args.steps)]
    code, out, peak = run_child(cmd)
    lines = [x for x in out.splitlines() if x.startswith(RESULT)]
    if code != 0 or not lines:
        raise RuntimeError(f"{side} {name} batch {batch} failed (exit {code}):\n{out[-4000:]}")
    marks = json.loads(lines[-1][len(RESULT):])
    if side == "trainctl" and (marks["exit"] != ExitCode.STOPPED or "steps_mib" not in marks):
        raise RuntimeError(f"trainctl {name} batch {batch} did not stop after {args.steps} steps:\n{out[-4000:]}")
    return {**marks, "process_mib": peak / 2**20}


def tables(results: dict, configs: list[str], batches: list[int], sides: list[str]) -> str:
    """One Markdown table per micro-batch: each side's peak (steps done), its delta over base, trainctl − timm."""
    out = []
    for b in batches:
        cells = {c: results[c][b] for c in configs}
        base = cells.get("base")
        head = ["configuration"]
        for side in sides:
            head += [f"{side} peak", f"{side} Δ base"]
        head += ["trainctl − timm"] * (len(sides) == 2) + ["trainctl + stop ckpt"] * ("trainctl" in sides)
        out += [f"micro-batch {b} x accumulation {ACCUM} (effective batch {b * ACCUM}), peak RSS MiB:", "",
                "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for c in configs:
            row = [c]
            for side in sides:
                v = cells[c][side]["steps_mib"]
                row += [f"{v:.0f}", f"{v - base[side]['steps_mib']:+.0f}" if base else ""]
            if len(sides) == 2:
                row.append(f"{cells[c]['trainctl']['steps_mib'] - cells[c]['timm']['steps_mib']:+.0f}")
            if "trainctl" in sides:
                row.append(f"{cells[c]['trainctl']['end_mib']:.0f}")
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=MODEL)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per process")
    p.add_argument("--batches", default="1,2", help="micro-batch sizes (accumulation 2 each)")
    p.add_argument("--configs", default=",".join(ADDITIONS), help=f"of: {', '.join(ADDITIONS)}")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--json", type=Path, help="also write the raw readings here")
    p.add_argument("--child-trainctl", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-timm", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_trainctl:
        trainctl_child(args.child_trainctl, args.steps)
    if args.child_timm:
        timm_child(args.child_timm, args.model, args.data, args.batch, args.steps)
    configs, sides = args.configs.split(","), args.sides.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    unknown = [c for c in configs if c not in ADDITIONS] + [s for s in sides if s not in SIDES]
    if unknown:
        p.error(f"unknown: {unknown}")
    root = Path(tempfile.mkdtemp(prefix="trainctl-recipe-memory-"))
    results: dict = {c: {b: {} for b in batches} for c in configs}
    try:
        data = class_folders(root / "data", photos(OUT / "photos", 400), CLASSES)
        for c in configs:
            for b in batches:
                for side in sides:
                    r = results[c][b][side] = measure(side, c, b, args, data, root)
                    print(f"  {c} batch {b} {side}: peak {r['steps_mib']:.0f} MiB after {args.steps} steps (imports "
                          f"{r['imports_mib']:.0f}, set up {r['setup_mib']:.0f}, sanity check {r.get('sanity_mib', 0):.0f}, "
                          f"at exit {r['end_mib']:.0f}, wait4 {r['process_mib']:.0f}; {r['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\npeak RSS of {args.steps} optimizer steps of {args.model}, {CLASSES} classes, CPU, {THREADS} threads "
          f"({machine()}):\n")
    print(tables(results, configs, batches, sides))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1,
                                        default=str))
    return results


if __name__ == "__main__":
    main()
