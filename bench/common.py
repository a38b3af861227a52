"""Shared bench helpers: photo-like JPEGs, tiny supervised runs, peak RSS of a child, machine facts."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

# A tiny model that trains "forever" on one rung (CPU unless told): the demo's small run with the default
# crop scale and rare logging; each bench adds its [checkpoint] / [supervisor] keys.
TINY = {
    "data": {"crop_scale": None},          # the default (0.08, 1.0), not the demo's [0.5, 1.0]
    "train": {"epochs": 100000, "log_every_steps": 1000},
}


def tiny_run(root: Path, name: str, checkpoint: dict | None = None, supervisor: dict | None = None,
             device: str = "cpu", per_class: int = 24, nproc: int = 1) -> Path:
    """A run folder with its frozen config over a small synthetic dataset (4 classes x `per_class` images); its rung
    takes 8 images per micro-batch, split over `nproc` processes."""
    from trainctl.supervisor.demo_data import make_dataset, small_config
    root = Path(root)
    data = "data" if per_class == 24 else f"data-{per_class}"
    if not (root / data).exists():
        make_dataset(root / data, per_class_train=per_class, per_class_val=0, size=40, seed=1)
    return frozen_run(root / f"{name}.toml", small_config(
        name, f"{data}/train", **TINY, checkpoint=checkpoint or {},
        supervisor={"keep_awake": False, **(supervisor or {})},
        profiles=[{"device": device, "batch_size": 8 // nproc, "nproc_per_node": nproc}]))


def frozen_run(path: Path, text: str) -> Path:
    """Write config `text` to `path` and make its run folder with the frozen config, as `trainctl start`
    does (without remembering the run among the user's runs); returns the run folder."""
    from trainctl.contract import config as configlib
    from trainctl.contract import fsio
    path.write_text(text)
    cfg = configlib.load(path)
    cfg.run_dir.mkdir(parents=True)
    fsio.atomic_write(cfg.run_dir / "config.toml", configlib.to_toml(cfg))
    return cfg.run_dir


def run_supervised(run_dir: Path) -> tuple[float, float]:
    """Run `run_dir`'s supervisor to its end, its output discarded; (start, end) on this process's time.time().
    Raises RuntimeError with the worker log's tail unless the run SUCCEEDED."""
    from trainctl.contract.lifecycle import State
    from trainctl.contract.runfolder import LOG_DIR, WORKER_LOG
    from trainctl.supervisor.runstate import read_state
    started = time.time()
    rc = subprocess.run([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    ended = time.time()
    state = read_state(run_dir)
    if rc or state is None or state.state != State.SUCCEEDED:
        log = run_dir / LOG_DIR / WORKER_LOG
        raise RuntimeError(f"trainctl exited {rc}, state {state and state.state}:\n"
                           f"{log.read_text()[-3000:] if log.exists() else ''}")
    return started, ended


def subset(folder: Path, count: int) -> Path:
    """A new folder of links to the first `count` photos in `folder` (a cache may hold more): by index, so every
    class has its share (sorted by folder, a small subset of a large cache was one class, and refused)."""
    import tempfile
    out = Path(tempfile.mkdtemp(prefix="trainctl-photos-"))
    for f in sorted(folder.rglob("*.jpg"), key=lambda f: f.name)[:count]:
        (out / f.parent.name).mkdir(exist_ok=True)
        (out / f.parent.name / f.name).symlink_to(f)
    return out


def start_supervisor(run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    """The run's supervisor, detached from our output; `env` adds variables (a fault spec)."""
    return subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def photos(root: Path, count: int = 120, classes: int = 4, seed: int = 0) -> Path:
    """JPEGs of 500–1500 px with photo-like content (smooth shapes, texture, noise), quality 90.

    Each photo is a pure function of (seed, index), so they are drawn in parallel, on every core."""
    from concurrent.futures import ProcessPoolExecutor
    root = Path(root)
    missing = [i for i in range(count) if not _photo_path(root, i, classes).exists()]
    if missing:
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_photo, [(root, i, classes, seed) for i in missing], chunksize=4))
    return root


def _photo_path(root: Path, i: int, classes: int) -> Path:
    return root / f"class{i % classes}" / f"photo{i:04d}.jpg"


def _photo(job: tuple[Path, int, int, int]) -> None:
    root, i, classes, seed = job
    rng = np.random.default_rng([seed, i])
    w, h = (int(v) for v in rng.integers(500, 1501, 2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.5, 6, 2) * np.pi / max(w, h)
        phase = rng.uniform(0, 6.28)
        img[..., c] = 110 + 80 * np.sin(x * fx + phase) * np.cos(y * fy)
    img += rng.normal(0, 12, (h, w, 3))
    path = _photo_path(root, i, classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")   # a photo interrupted half-written is not taken for a whole one next time
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp, format="JPEG", quality=90)
    tmp.rename(path)


def rotated(items: list, repeat: int) -> list:
    """`items` starting at position `repeat` (mod len): alternated variants take turns at running first."""
    k = repeat % len(items)
    return items[k:] + items[:k]


def alternated(variants: dict, repeats: int, unit: str = "") -> dict[str, list]:
    """Each variant (a callable returning one measurement) run `repeats` times, the variants taking turns at
    running first. With `unit`, each result is printed as it comes: a run cut short by a time limit keeps
    what it measured."""
    runs = {name: [] for name in variants}
    for repeat in range(repeats):
        for name in rotated(list(variants), repeat):
            runs[name].append(variants[name]())
            if unit:
                print(f"  repeat {repeat + 1}: {name} {runs[name][-1]:.1f} {unit}", flush=True)
    return runs


def medians(runs: dict[str, list], title: str, unit: str = "images/s") -> dict[str, float]:
    """Each variant's median of `alternated`'s runs, printed under `title` with every repeat beside it."""
    result = {name: statistics.median(v) for name, v in runs.items()}
    print(title)
    width = max(map(len, runs)) + 2
    for name, v in result.items():
        print(f"  {name:{width}s} {v:7.1f} {unit}   (each repeat: {', '.join(f'{x:.1f}' for x in runs[name])})")
    return result


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores (nproc), {mem:.0f} GiB RAM{gpu()}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def gpu() -> str:
    """', GPU: <name>' where nvidia-smi sees one (no torch import: some benches time the supervisor alone)."""
    if not shutil.which("nvidia-smi"):
        return ""
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return f", GPU: {out.splitlines()[0]} (driver)" if out else ""


def run_child(args: list[str], env: dict | None = None, timeout: float = 3600) -> tuple[int, str, int]:
    """Run a child process; return (exit code, its output, its peak RSS in bytes) via wait4."""
    import tempfile
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read().decode(errors="replace")
    scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, out, usage.ru_maxrss * scale


@contextlib.contextmanager
def timm_train_run(wrapper: str, train_py: Path, flags: list[str], scratch, record_env: str, keep: bool,
                   what: str = ""):
    """timm's train.py run through `wrapper` (Python code taking train.py's path first, then its flags, and writing
    a JSON record to $`record_env`) in a scratch folder of its own. Yields (folder, record, started, ended) on the
    bench's clock; raises with the log's tail if train.py fails; the folder goes afterwards unless `keep`."""
    work = Path(tempfile.mkdtemp(prefix="timm-", dir=scratch))
    cmd = [sys.executable, "-c", wrapper, str(train_py), *flags, "--output", str(work), "--experiment", "run"]
    try:
        with open(work / "train.log", "wb") as log:
            started = time.time()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                env={**os.environ, record_env: str(work / "record.json")}).returncode
            ended = time.time()
        if rc:
            raise RuntimeError(f"timm train.py exited {rc}{what}:\n{(work / 'train.log').read_text()[-3000:]}")
        yield work, json.loads((work / "record.json").read_text()), started, ended
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
