"""Drop path and dropout masks per sample (worker/masks.py): the same masks for an image whichever micro-batch it
is in, so a rung change with [model] drop_path_rate / drop_rate on trains the same model (issue 18)."""
from __future__ import annotations

import signal

import numpy as np
import pytest
import timm
import torch
from conftest import config_text, make_run, max_weight_difference, run_worker

from trainctl.contract.protocol import ExitCode
from trainctl.worker import masks

DROPS = {"drop_path_rate": 0.3, "drop_rate": 0.3}
LADDER = [{"device": "cpu", "batch_size": 8}, {"device": "cpu", "batch_size": 1}]   # 8 x 2, then 1 x 16


def test_a_samples_draws_do_not_depend_on_its_neighbours():
    together = masks.uniforms(12345, np.arange(3, 7), 5)
    alone = np.concatenate([masks.uniforms(12345, np.array([p]), 5) for p in range(3, 7)])
    assert np.array_equal(together, alone)
    many = masks.uniforms(7, np.arange(20000), 1)
    assert abs(float((many < 0.9).mean()) - 0.9) < 0.01 and 0 <= many.min() and many.max() < 1


def test_a_model_drops_the_same_paths_for_an_image_in_a_batch_of_4_or_alone():
    masks.install()
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32, **DROPS).train()
    x = torch.randn(4, 3, 32, 32)
    with masks.MASKS.drawing(7, 3, 0, 4):
        batch = model(x)
    one_by_one = []
    for i in range(4):
        with masks.MASKS.drawing(7, 3, i, 1):
            one_by_one.append(model(x[i:i + 1]))
    assert torch.allclose(batch, torch.cat(one_by_one), atol=1e-5)
    # timm's own draws (outside a training step: the global generator) differ between the two cuts
    torch.manual_seed(1)
    batch = model(x)
    torch.manual_seed(1)
    alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert not torch.allclose(batch, alone, atol=1e-3)
    with masks.MASKS.drawing(7, 4, 0, 4):   # another step: other masks
        assert not torch.allclose(model(x), torch.cat(one_by_one), atol=1e-3)


@pytest.fixture(scope="module")
def dropped_reference(tmp_path_factory, dataset):
    run_dir = make_run(tmp_path_factory.mktemp("dropref"), "dropref",
                       config_text("dropref", dataset, model=DROPS, profiles=LADDER))
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    return run_dir


def test_a_run_with_drop_path_and_dropout_moved_to_batch_1_trains_the_same_model(tmp_path, dataset,
                                                                                 dropped_reference):
    """Killed at step 15 on batch 8 x 2, finished on batch 1 x 16: equal to the uninterrupted run up to float
    summation order (timm's per-call masks: another model, about 1e-3 away)."""
    run_dir = make_run(tmp_path, "dropswitch", config_text("dropswitch", dataset, model=DROPS, profiles=LADDER))
    assert run_worker(run_dir, faults="train_step:sigkill@15:once").returncode == -signal.SIGKILL
    result = run_worker(run_dir, rung=2, attempt=2)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    diff = max_weight_difference(run_dir / "model.safetensors", dropped_reference / "model.safetensors")
    print(f"max abs weight difference after the switch to batch 1: {diff:.3e}")
    assert 0 < diff < 1e-5
