"""Shared helpers: a small real dataset, run folders with frozen configs, real worker processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainctl.contract import config as configlib
from trainctl.contract import fsio
from trainctl.supervisor.demo_data import make_dataset, small_config
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.waiting import wait_for  # noqa: F401 (the tests' one poll helper)

# The tests' run: the small run of the demo data with quick restarts and a two-rung ladder (8, then 4 x 2).
TEST_RUN = {
    "run": {"seed": 7},
    "train": {"log_every_steps": 2},
    "checkpoint": {"every_steps": 3, "every_seconds": 0, "keep_last": 2},
    "supervisor": {"backoff_seconds": [0.1], "poll_seconds": 0.1, "hang_timeout_seconds": 60,
                   "max_restarts_per_profile": 3},
    "profiles": [{"device": "cpu", "batch_size": 8}, {"device": "cpu", "batch_size": 4}],
}
LONG = {"epochs": 12}     # [train] of a 72-step run: time to hit a worker mid-training


@pytest.fixture(autouse=True)
def own_state_home(tmp_path_factory, monkeypatch):
    """Each test its own $XDG_STATE_HOME (the registry of runs, the rung memory), inherited by the processes it
    starts: a test's OOM must not make a later test's run start a rung lower, nor touch the person's home."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """4 classes x 24 training images (JPEG and PNG), 6 validation images each."""
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, per_class_train=24, per_class_val=6, size=40, seed=1)


def config_text(name: str, dataset, **sections) -> str:
    """The tests' config for run `name` over `dataset`; each keyword is a section whose keys replace TEST_RUN's."""
    merged = {section: {**TEST_RUN.get(section, {}), **sections.get(section, {})}
              for section in (TEST_RUN.keys() | sections.keys()) - {"profiles"}}
    return small_config(name, dataset[0], dataset[1], profiles=sections.get("profiles", TEST_RUN["profiles"]), **merged)


def make_run(tmp_path: Path, name: str, text: str) -> Path:
    """Write the config, load it (validated) and freeze it into its run folder, as `trainctl start` does."""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    cfg = configlib.load(path)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write(cfg.run_dir / "config.toml", configlib.to_toml(cfg))
    return cfg.run_dir


def run_worker(run_dir: Path, rung: int = 1, attempt: int = 1, faults: str = "", timeout: float = 240,
               **popen) -> subprocess.CompletedProcess:
    """A worker run by hand (no supervisor) on rung `rung` (1 = first), to its end."""
    env = {**os.environ, "TRAINCTL_FAULTS": faults}
    env.pop("TRAINCTL_SUPERVISOR_PID", None)
    return subprocess.run([sys.executable, "-m", "trainctl.worker", "--run-dir", str(run_dir), "--rung",
                           str(rung), "--attempt", str(attempt)], env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


def write_file(path: Path, text: str) -> Path:
    """`text` into `path`, its folders made: fixture trees (/proc, /sys/fs/cgroup) in a temporary folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def roots(tmp_path):
    """An empty /proc and /sys/fs/cgroup to fill."""
    return tmp_path / "proc", tmp_path / "cgroup"


def start_supervisor(run_dir: Path, faults: str = "") -> subprocess.Popen:
    """A real supervisor of `run_dir` (with a fault spec), its output captured."""
    env = {**os.environ, "TRAINCTL_FAULTS": faults}
    return subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    """The supervisor's output once it has exited (killed if it outlives `timeout`)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return out


def photo(w: int, h: int, seed: int = 0, noise: float = 8):
    """A smooth colour gradient with noise (a PIL image): JPEG-friendly, and its orientation is visible."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 60.0)], axis=2)
    return Image.fromarray(np.clip(base + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8))


def weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, dataset) -> Path:
    """One uninterrupted run of the base config on rung 1: what every recovered run must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = make_run(tmp, "reference", config_text("reference", dataset))
    result = run_worker(run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@pytest.fixture(scope="session")
def long_reference(tmp_path_factory, dataset) -> Path:
    """An uninterrupted run of the LONG config."""
    tmp = tmp_path_factory.mktemp("long-reference")
    run_dir = make_run(tmp, "long-reference", config_text("long-reference", dataset, train=LONG))
    result = run_worker(run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def max_weight_difference(a: Path, b: Path) -> float:
    """The largest |a - b| over every tensor of two safetensors files of the same model (a rung switch's drift)."""
    wa, wb = weights(a), weights(b)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-identical model.safetensors in two run folders (torch.equal on every tensor)."""
    import torch
    wa, wb = weights(a / "model.safetensors"), weights(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ: {different[:5]}"


def events(run_dir: Path, kind: str) -> list[dict]:
    """The run's journal events of one kind, oldest first."""
    return [e for e in read_events(run_dir) if e["kind"] == kind]


