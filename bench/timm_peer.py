"""End to end against timm's own train.py: the same job run by both tools, alternated, best of N.

The peer is timm's `train.py` from its public repository, not vendored here: whoever runs the bench fetches it and
passes its path. The job: one epoch over `--photos` photo-like JPEGs (drawn by common.photos, then shrunk to a
longer side of `--long-side` px and cached), 4 classes, `--model` at its own input size from scratch, batch 16,
2 loader processes, CPU; once without validation and once with a validation split (`--val-photos`).

Per tool: wall time (process start → exit, on this bench's clock), time to the first optimizer step, steady-state
images/s (the first `--skip` steps left out: the loader processes' start and prefetch) and the time from the
last optimizer step to exit. trainctl's step times come from its run folder (metrics.jsonl with
log_every_steps = 1, heartbeat timings); timm's from a global optimizer-step hook that a small wrapper (HOOK)
installs before it runs train.py unchanged. The same recipe as far as the two allow:

- both: AdamW lr 1e-3, weight decay 0.05 (timm's create_optimizer_v2: no decay on biases and norms), cosine
  schedule stepped per optimizer step over the epoch, no warmup, min lr 0; plain cross-entropy (no label
  smoothing); random-resized crop (0.08–1, 3/4–4/3) at the model's interpolation, horizontal flip 0.5, no color
  jitter / auto-augment / random erasing / mixup; the model's own mean, std and eval crop; seed 42; torch's default
  thread count; an epoch-end checkpoint.
- they differ in: the data path (trainctl: its own JPEG decode at reduced size, uint8 micro-batches normalised in
  the training process; timm: PIL full decode and torchvision transforms in the loader processes); trainctl's
  deterministic algorithms and per-step re-seeding; timm's persistent loader processes; what ends the run
  (trainctl: a fsync'd checkpoint, then the exported model; timm: checkpoint-0.pth.tar + last.pth.tar, not
  fsync'd); trainctl's supervisor process, sanity check and per-step heartbeat.

    git --git-dir=<clone of huggingface/pytorch-image-models> show HEAD:train.py > /tmp/timm_train.py
    python bench/timm_peer.py --timm-train /tmp/timm_train.py [--repeats 3] [--variants train,val] [--lock FILE]
                              [--photos 512] [--val-photos 128] [--long-side 640] [--cache DIR] [--json FILE]

trainctl is whichever `import trainctl` finds: to measure the landed code beside a working tree in flux, extract it
(`git archive HEAD`, laid out as trainctl/{contract,supervisor,worker}) and put it first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, photos, rotated, timm_train_run  # noqa: E402
from timeline import Moment, moments, render, segments  # noqa: E402

SKIP = 4   # warm-up steps left out of images/s: 2 loader processes x a prefetch of 2 batches each
TOOLS = ("timm train.py", "trainctl")

# Runs timm's train.py unchanged, with a global optimizer-step hook that timestamps every step (timm logs
# without timestamps). train.py imports torch first thing, so importing it here first costs nothing extra.
HOOK = """
import atexit, json, os, runpy, sys, time
marks, steps = {}, []
def save():
    with open(os.environ["TIMM_PEER_STEPS"], "w") as f:
        json.dump({**marks, "steps": steps}, f)
atexit.register(save)
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(lambda *a: steps.append(time.time()))
sys.argv = sys.argv[1:]
train = runpy.run_path(sys.argv[0], run_name="timm_train")
marks["imported"] = time.time()
train["main"]()
"""


@dataclass(frozen=True)
class Run:
    """One run of one tool: the bench's clock around its process, and its optimizer steps' times."""
    tool: str
    started: float
    ended: float
    steps: tuple[float, ...]
    imported: float | None = None                          # train.py's module level done / trainctl's worker imports
    timeline: tuple[Moment, ...] = field(default=(), repr=False)   # trainctl: the run folder's moments

    @property
    def wall(self) -> float:
        return self.ended - self.started

    @property
    def first_step(self) -> float:
        return self.steps[0] - self.started

    @property
    def last_to_exit(self) -> float:
        return self.ended - self.steps[-1]

    def images_per_second(self, batch: int, skip: int) -> float:
        """Steady state: the steps after the first `skip`."""
        if len(self.steps) < skip + 2:
            raise ValueError(f"{self.tool}: {len(self.steps)} steps timed, too few to leave out {skip} (--skip)")
        return (len(self.steps) - skip - 1) * batch / (self.steps[-1] - self.steps[skip])


# ---- the photos --------------------------------------------------------------------------------------------------
def job_data(cache: Path, train: int, val: int, long_side: int) -> Path:
    """A folder with train/ and val/ ImageFolders: photos 0..train-1 and the next `val`, shrunk (cached)."""
    drawn = photos(cache / "drawn", train + val)
    job = cache / f"job-{long_side or 'drawn'}-{train}-{val}"
    for i, src in enumerate(sorted(drawn.rglob("photo*.jpg"), key=lambda p: p.name)[:train + val]):
        dst = job / ("train" if i < train else "val") / src.parent.name / src.name
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not long_side:
            dst.symlink_to(src)
            continue
        tmp = dst.with_suffix(".tmp")   # a photo cut short by an interrupt is not taken for a whole one next time
        with Image.open(src) as img:
            img.thumbnail((long_side, long_side), Image.LANCZOS)   # the longer side to `long_side`, never larger
            img.save(tmp, format="JPEG", quality=90)
        tmp.rename(dst)
    return job


# ---- the two tools -----------------------------------------------------------------------------------------------
def timm_flags(args, data: Path, val: bool) -> list[str]:
    """train.py's flags for the job; the recipe as close to trainctl's defaults as its flags allow."""
    return [str(data), "--train-split", "train", "--val-split", "val" if val else "",
            "--model", args.model, "--num-classes", "4", "--epochs", "1", "--batch-size", str(args.batch),
            "--workers", str(args.workers), "--device", "cpu", "--no-prefetcher", "--seed", "42",
            "--opt", "adamw", "--lr", str(args.lr), "--weight-decay", "0.05",
            "--sched", "cosine", "--sched-on-updates", "--warmup-epochs", "0", "--min-lr", "0", "--smoothing", "0",
            "--scale", "0.08", "1.0", "--ratio", str(3 / 4), str(4 / 3), "--hflip", "0.5", "--color-jitter", "0",
            "--reprob", "0", "--train-interpolation", ""]   # "": the model's own interpolation, as trainctl uses


def timm_run(args, data: Path, val: bool) -> Run:
    """One run of timm's train.py through HOOK, in a scratch folder of its own (its output and log)."""
    with timm_train_run(HOOK, args.timm_train, timm_flags(args, data, val), args.scratch, "TIMM_PEER_STEPS",
                        args.keep) as (_, record, started, ended):
        return Run(TOOLS[0], started, ended, tuple(record["steps"]), record.get("imported"))


def trainctl_config(args, data: Path, val: bool, root: Path) -> str:
    """The job as a trainctl config (the demo's small run with the job's model, data, batch and loader)."""
    from trainctl.supervisor.demo_data import small_config
    return small_config(
        "peer", data / "train", data / "val" if val else None,
        run={"runs_dir": str(root / "runs")},
        model={"name": args.model, "img_size": None},
        data={"crop_scale": None},                    # the default (0.08, 1.0), as timm's
        train={"epochs": 1, "effective_batch_size": args.batch, "lr": args.lr, "threads": None,   # torch's default
               "log_every_steps": 1},                # every step's time in metrics.jsonl
        supervisor={"keep_awake": False},
        profiles=[{"device": "cpu", "batch_size": args.batch, "num_workers": args.workers}])


def trainctl_run(args, data: Path, val: bool) -> Run:
    """One supervised run on a frozen config; its step times and timeline read back from the run folder."""
    from common import frozen_run, run_supervised
    from trainctl.contract.runfolder import read_metrics
    root = Path(tempfile.mkdtemp(prefix="trainctl-peer-", dir=args.scratch))
    try:
        run_dir = frozen_run(root / "run.toml", trainctl_config(args, data, val, root))
        started, ended = run_supervised(run_dir)
        steps = tuple(m["time"] for m in read_metrics(run_dir) if m.get("kind") == "train")
        items = tuple(moments(run_dir, started, ended))
        imported = next((m.time for m in items if m.name.startswith("imports done")), None)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return Run(TOOLS[1], started, ended, steps, imported, items)


def seconds_of(cmd: list[str]) -> float:
    """Wall time of one command (checked)."""
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


# What every process that trains with torch pays, whichever tool: the imports, and the interpreter's finalization
# after its last line (measured against os._exit, which skips it).
FLOOR = """
import os, sys, time
began = time.time()
import torch, timm, timm.data, timm.optim, timm.scheduler
sys.stdout.write(f"{began} {time.time()}"); sys.stdout.flush()
if sys.argv[1:] == ["os._exit"]:
    os._exit(0)
"""


def floor(skip_finalization: bool = False) -> dict:
    """A torch + timm process's start, imports and exit: seconds of each (the bench's clock around it)."""
    started = time.time()
    out = subprocess.run([sys.executable, "-c", FLOOR, *(["os._exit"] if skip_finalization else [])],
                         check=True, capture_output=True, text=True).stdout.split()
    ended = time.time()
    began, imported = float(out[0]), float(out[1])
    return {"start": began - started, "imports": imported - began, "exit": ended - imported}


# The model's own step rate: forward, backward and AdamW on a batch already in memory (no loader, no decode), the
# same model, batch and threads as the runs. Neither tool's steady state can pass it on the same cores.
CEILING = """
import sys, time, torch, timm, timm.optim
model_name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = timm.create_model(model_name, num_classes=4)
opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 4, (batch,))
times = []
for _ in range(steps + 3):
    began = time.perf_counter()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - began)
print(batch * steps / sum(times[3:]))
"""


def ceiling(model: str, batch: int, steps: int = 20) -> float:
    """Images/s of the model's bare training step (CEILING) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CEILING, model, str(batch), str(steps)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


@contextlib.contextmanager
def locked(path: Path | None):
    """Hold the shared CPU lock (flock(2), as flock(1) takes it) for one round; nothing when no path."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        waited = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        if time.monotonic() - waited > 1:
            print(f"  (waited {time.monotonic() - waited:.0f} s for {path})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- the report --------------------------------------------------------------------------------------------------
def summary(runs: dict[str, list[Run]], args) -> dict:
    """Per tool: each figure's best (min of times, max of images/s) and median over the repeats."""
    out = {}
    for tool, rs in runs.items():
        figures = {"wall": [r.wall for r in rs], "first_step": [r.first_step for r in rs],
                   "images_per_s": [r.images_per_second(args.batch, args.skip) for r in rs],
                   "last_to_exit": [r.last_to_exit for r in rs],
                   "training_span": [r.steps[-1] - r.steps[0] for r in rs],
                   "imports": [r.imported - r.started for r in rs if r.imported]}
        out[tool] = {k: {"best": (max if k == "images_per_s" else min)(v), "median": statistics.median(v), "each": v}
                     for k, v in figures.items() if v}
        out[tool]["steps"] = len(rs[0].steps)
    t, c = out[TOOLS[0]], out[TOOLS[1]]
    out["wall_ratio"] = c["wall"]["best"] / t["wall"]["best"]
    out["wall_ratio_median"] = c["wall"]["median"] / t["wall"]["median"]
    out["images_per_s_ratio"] = c["images_per_s"]["best"] / t["images_per_s"]["best"]
    out["images_per_s_ratio_median"] = c["images_per_s"]["median"] / t["images_per_s"]["median"]
    return out


ROWS = (("wall", "wall time, process start → exit (s)"), ("first_step", "start → first optimizer step (s)"),
        ("imports", "start → imports done (s)"),
        ("images_per_s", "steady-state images/s"), ("training_span", "first → last optimizer step (s)"),
        ("last_to_exit", "last optimizer step → exit (s)"))


def table(s: dict) -> str:
    """The Markdown table of one variant: each figure's best (median) per tool, and trainctl / timm."""
    lines = [f"| best (median) of {len(s[TOOLS[0]]['wall']['each'])} | {TOOLS[0]} | {TOOLS[1]} | trainctl / timm |",
             "|---|---:|---:|---:|"]
    for key, label in ROWS:
        t, c = s[TOOLS[0]].get(key), s[TOOLS[1]].get(key)
        if not t or not c:
            continue
        ratio = f"{c['best'] / t['best']:.2f}× ({c['median'] / t['median']:.2f}×)"
        lines.append(f"| {label} | {t['best']:.2f} ({t['median']:.2f}) | {c['best']:.2f} ({c['median']:.2f}) "
                     f"| {ratio} |")
    for tool in TOOLS:
        lines.append(f"| {tool}: each wall time (s) | {', '.join(f'{w:.1f}' for w in s[tool]['wall']['each'])} | | |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (from its repository)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="train,val", help="train (no validation), val (a validation split)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="loader processes, both tools")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--photos", type=int, default=512, help="training photos (one epoch)")
    p.add_argument("--val-photos", type=int, default=128)
    p.add_argument("--long-side", type=int, default=640, help="shrink the drawn photos to this (0: as drawn)")
    p.add_argument("--skip", type=int, default=SKIP, help="first steps left out of images/s")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "trainctl-peer-photos")
    p.add_argument("--scratch", type=Path, default=None, help="where the runs' folders go (deleted after each)")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders")
    p.add_argument("--lock", type=Path, help="flock this file around each pair of runs (a shared machine)")
    p.add_argument("--extras", type=int, default=3, help="times to measure the import and preflight costs (0: not)")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    args.timm_train = args.timm_train.resolve()
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    with locked(args.lock):
        started = time.monotonic()
        data = job_data(args.cache, args.photos, args.val_photos, args.long_side)
        print(f"  photos ready in {data} after {time.monotonic() - started:.0f} s", flush=True)
    tools = {TOOLS[0]: timm_run, TOOLS[1]: trainctl_run}
    runs = {v: {t: [] for t in TOOLS} for v in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            with locked(args.lock):
                for tool in rotated(list(TOOLS), repeat):
                    r = tools[tool](args, data, variant == "val")
                    runs[variant][tool].append(r)
                    print(f"  repeat {repeat + 1} {variant}: {tool:14s} wall {r.wall:5.1f} s, first step "
                          f"{r.first_step:5.1f} s, {r.images_per_second(args.batch, args.skip):5.1f} images/s, "
                          f"last step → exit {r.last_to_exit:4.1f} s", flush=True)
    import trainctl   # PYTHONPATH may point at another copy (e.g. a `git archive` of the landed code)
    result: dict = {"machine": machine(), "trainctl": str(Path(trainctl.__file__).parent),
                    "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"  trainctl measured: {result['trainctl']}")
    for variant in (v for v in variants if runs[v][TOOLS[0]]):   # --repeats 0: the extras alone
        s = result[variant] = summary(runs[variant], args)
        best = min(runs[variant][TOOLS[1]], key=lambda r: r.wall)
        s["timeline"] = [{"name": m.name, "time": m.time, "source": m.source} for m in best.timeline]
        s["fixed_costs"] = segments(list(best.timeline))
        validation = f" + validation on {args.val_photos}" if variant == "val" else ", no validation"
        print(f"\n{args.model}, one epoch of {args.photos} photos (longer side {args.long_side or 'as drawn'} px)"
              f"{validation}, batch {args.batch}, {args.workers} loader processes, CPU ({result['machine']}):")
        print(table(s))
        print(f"  trainctl / timm wall time: {s['wall_ratio']:.2f}x best, {s['wall_ratio_median']:.2f}x median "
              f"(target <= 0.95x); images/s: {s['images_per_s_ratio']:.2f}x best, "
              f"{s['images_per_s_ratio_median']:.2f}x median (target >= 1.1x)")
        print(f"\ntimeline of the fastest trainctl run ({variant}):")
        print(render(list(best.timeline)))
        print("fixed costs, largest first:")
        for what, seconds in s["fixed_costs"]:
            print(f"  {seconds:6.2f} s  {what}")
    if args.extras:
        with locked(args.lock):
            root = Path(tempfile.mkdtemp(prefix="trainctl-peer-", dir=args.scratch))
            (root / "run.toml").write_text(trainctl_config(args, data, False, root))
            floors = [floor() for _ in range(args.extras)]
            quick = [floor(skip_finalization=True) for _ in range(args.extras)]
            preflight = [seconds_of([sys.executable, "-m", "trainctl.worker", "--check-config", str(root / "run.toml")])
                         for _ in range(args.extras)]
            bare = [ceiling(args.model, args.batch) for _ in range(args.extras)]
            shutil.rmtree(root, ignore_errors=True)
        result["floor"] = {k: min(f[k] for f in floors) for k in floors[0]}
        result["floor"]["exit_with_os_exit"] = min(f["exit"] for f in quick)
        result["preflight"] = min(preflight)
        result["ceiling_images_per_s"] = max(bare)
        f = result["floor"]
        print(f"\na process that imports torch + timm and exits, best of {args.extras}: "
              f"Python start {f['start']:.2f} s, imports {f['imports']:.2f} s, "
              f"exit after its last line {f['exit']:.2f} s (with os._exit: "
              f"{f['exit_with_os_exit']:.2f} s)")
        print(f"`trainctl start`'s preflight (python -m trainctl.worker --check-config), which the trainctl runs above "
              f"do not include: {result['preflight']:.2f} s")
        print(f"the model's bare training step (a batch in memory, no loader), best of {args.extras}: "
              f"{result['ceiling_images_per_s']:.2f} images/s, an upper bound for either tool's steady state "
              f"with this model, batch and precision")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
