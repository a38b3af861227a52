"""The model factory (local weights files) and the device layer, MPS simulated where it must be."""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from conftest import config_text
from safetensors.torch import save_file

from trainctl.contract.config import ConfigError, Profile, load
from trainctl.worker import device, faults
from trainctl.worker.model import build_model, recipe_for


def cfg_with(tmp_path, dataset, **model):
    path = tmp_path / "c.toml"
    path.write_text(config_text("m", dataset))
    cfg = load(path)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_are_loaded_head_included_when_classes_match(tmp_path, dataset, suffix):
    torch.manual_seed(123)
    source = timm.create_model("test_vit", num_classes=4, img_size=32)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = build_model(cfg_with(tmp_path, dataset, weights=str(path)), num_classes=4)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_local_weights_with_another_head_keep_the_body_only(tmp_path, dataset):
    torch.manual_seed(5)
    source = timm.create_model("test_vit", num_classes=1000, img_size=32)
    path = tmp_path / "imagenet.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model(cfg_with(tmp_path, dataset, weights=str(path)), num_classes=4)
    mine, theirs = model.state_dict(), source.state_dict()
    assert mine["head.weight"].shape == (4, mine["head.weight"].shape[1])
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith("head."))


def test_weights_that_do_not_fit_are_a_config_error(tmp_path, dataset):
    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ConfigError, match="does not fit"):
        build_model(cfg_with(tmp_path, dataset, weights=str(path)), num_classes=4)


def test_recipe_comes_from_timm_not_hard_coded(tmp_path, dataset):
    cfg = cfg_with(tmp_path, dataset)
    recipe = recipe_for(cfg, build_model(cfg, 4))
    assert recipe.size == 32 and recipe.mean == (0.5, 0.5, 0.5) and recipe.interpolation == "bicubic"
    assert recipe.crop_pct == 0.95   # test_vit's own, not ImageNet's 0.875


@pytest.mark.parametrize("message,oom", [
    (faults.MPS_OOM_TEXT, True),
    (faults.CUDA_OOM_TEXT, True),
    (faults.CPU_OOM_TEXT, True),
    ("MPS backend out of memory (MPS allocated: 9.1 GB, other allocations: 0 bytes, max allowed: 9.07 GB)", True),
    ("Expected all tensors to be on the same device", False),
    ("shape '[8, 3]' is invalid for input of size 10", False),
])
def test_out_of_memory_is_recognised_on_every_backend(message, oom):
    assert device.is_oom(RuntimeError(message)) is oom


def test_oom_types():
    assert device.is_oom(torch.OutOfMemoryError("CUDA out of memory")) and device.is_oom(MemoryError())
    assert not device.is_oom(ValueError("out of memory"))   # only errors an allocator raises


def test_mps_forces_loader_processes_off():
    with pytest.warns(UserWarning, match="ignored on MPS"):
        assert device.loader_workers(Profile(batch_size=2, device="mps", num_workers=4), torch.device("mps")) == 0
    assert device.loader_workers(Profile(batch_size=2, device="cpu", num_workers=4), torch.device("cpu")) == 4


def test_mps_empty_cache_every_n_micro_batches(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append(1))
    profile = Profile(batch_size=1, device="mps", empty_cache_every=100)
    for n in range(1, 251):
        device.after_micro_batch(profile, torch.device("mps"), n)
        device.after_micro_batch(profile, torch.device("cpu"), n)
    assert len(calls) == 2


def test_mps_memory_is_reported(monkeypatch):
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 7 << 30)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 5 << 30)
    assert device.memory_stats(torch.device("mps")) == {"mps_driver_allocated": 7 << 30,
                                                        "mps_current_allocated": 5 << 30}


def test_mps_memory_fraction_is_applied(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.mps, "set_per_process_memory_fraction", seen.append)
    device.prepare(Profile(batch_size=1, device="mps", memory_fraction=0.7), torch.device("mps"))
    assert seen == [0.7]


def test_unavailable_devices_are_config_errors():
    if not device.mps_available():
        with pytest.raises(ConfigError, match="no MPS"):
            device.resolve(Profile(batch_size=1, device="mps"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            device.resolve(Profile(batch_size=1, device="cuda"))
    assert device.resolve(Profile(batch_size=1, device="auto")).type in ("cpu", "cuda", "mps")
