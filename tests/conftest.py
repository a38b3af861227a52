"""Shared helpers: a small real dataset, run folders with frozen configs, real worker processes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainctl.supervisor.demo_data import make_dataset
from trainctl.supervisor.journal import read_events
from trainctl.worker import config as configlib
from trainctl.worker import fsio

BASE_CONFIG = """\
[run]
name = "{name}"
runs_dir = "runs"
seed = 7
[model]
name = "test_vit"
img_size = 32
[data]
train_dir = "{train}"
val_dir = "{val}"
crop_scale = [0.5, 1.0]
[train]
epochs = 3
effective_batch_size = 16
lr = 1e-3
log_every_steps = 2
threads = 1
[checkpoint]
every_steps = 3
every_seconds = 0
keep_last = 2
[supervisor]
backoff_seconds = [0.1]
poll_seconds = 0.1
hang_timeout_seconds = 60
max_restarts_per_profile = 3
{supervisor_extra}
[[profiles]]
device = "cpu"
batch_size = 8
[[profiles]]
device = "cpu"
batch_size = 4
{extra}
"""


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """4 classes x 24 training images (JPEG and PNG), 6 validation images each."""
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, per_class_train=24, per_class_val=6, size=40, seed=1)


def config_text(name: str, dataset, extra: str = "", supervisor_extra: str = "",
                replace: dict[str, str] | None = None) -> str:
    """The base config for run `name`; `replace` swaps exact substrings (each must be present)."""
    text = BASE_CONFIG.format(name=name, train=dataset[0], val=dataset[1], extra=extra,
                              supervisor_extra=supervisor_extra)
    for old, new in (replace or {}).items():
        assert old in text, f"{old!r} is not in the base config"
        text = text.replace(old, new)
    return text


def make_run(tmp_path: Path, name: str, text: str) -> Path:
    """Write the config, load it (validated) and freeze it into its run folder, as `trainctl start` does."""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    cfg = configlib.load(path)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write(cfg.run_dir / "config.toml", configlib.to_toml(cfg))
    return cfg.run_dir


def run_worker(run_dir: Path, profile: int = 0, attempt: int = 1, faults: str = "", timeout: float = 240,
               **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINCTL_FAULTS": faults}
    env.pop("TRAINCTL_SUPERVISOR_PID", None)
    return subprocess.run([sys.executable, "-m", "trainctl.worker", "--run-dir", str(run_dir), "--profile",
                           str(profile), "--attempt", str(attempt)], env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, dataset) -> Path:
    """One uninterrupted run of the base config on rung 0: what every recovered run must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = make_run(tmp, "reference", config_text("reference", dataset))
    result = run_worker(run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


LONG = {"epochs = 3": "epochs = 12"}     # 72 steps: time to hit a worker mid-training


@pytest.fixture(scope="session")
def long_reference(tmp_path_factory, dataset) -> Path:
    """An uninterrupted run of the LONG config."""
    tmp = tmp_path_factory.mktemp("long-reference")
    run_dir = make_run(tmp, "long-reference", config_text("long-reference", dataset, replace=LONG))
    result = run_worker(run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


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


