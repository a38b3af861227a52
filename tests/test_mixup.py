"""Mixup/CutMix over the effective batch (worker/mixup.py): the same pairs, λ and boxes on every rung."""
from __future__ import annotations

import signal
import types

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, config_text, make_run, max_weight_difference, run_worker
from timm.data.mixup import Mixup

from trainctl.contract import fixed
from trainctl.contract.protocol import ExitCode
from trainctl.worker.mixup import Mixing, soft_cross_entropy

E, SIZE, CLASSES = 8, 16, 5


def settings(**over):
    base = dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5,
                mixup_mode="batch")
    return types.SimpleNamespace(**{**base, **over})


def mixing(**over) -> Mixing:
    return Mixing(settings(**over), seed=7, E=E, size=SIZE, num_classes=CLASSES, smoothing=0.1)


def step_inputs(step: int):
    """A step's E images (normalised floats) and labels, as the loader would give them by position."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(E, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (E,), generator=g)


def mixed_by_micro_batches(m: Mixing, step: int, b: int):
    """The step's mixed inputs and soft targets computed micro-batch by micro-batch of size b, each micro-batch
    fetching its partners by position (as data.MicroBatches does)."""
    images, labels = step_inputs(step)
    plan = m.plan(0, step)
    xs, ts = [], []
    for start in range(0, E, b):
        positions = list(range(start, start + b))
        partners = [plan.partner(p) for p in positions]
        x = images[positions].clone()
        lam = m.mix(plan, positions, x, images[partners], torch.ones(b, dtype=torch.bool))
        xs.append(x)
        ts.append(m.targets(labels[positions], labels[partners], lam))
    return torch.cat(xs), torch.cat(ts)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_every_rung_mixes_the_same_pairs_with_the_same_lambda_and_boxes(mode):
    m = mixing(mixup_mode=mode)
    for step in range(6):   # several steps: Mixup and CutMix both come up
        whole = mixed_by_micro_batches(m, step, E)
        for b in (1, 2, 4):
            x, t = mixed_by_micro_batches(m, step, b)
            assert torch.equal(x, whole[0]) and torch.equal(t, whole[1]), (mode, step, b)
    kinds = set(np.concatenate([m.plan(0, s).cutmix for s in range(6)]).tolist())
    assert kinds == {True, False}   # both kinds were exercised


def test_at_micro_batch_1_an_image_is_mixed_with_another_not_itself():
    """timm's batch-level pairing at batch 1 mixes an image with itself (a no-op); here its partner is position
    E-1-i of the effective batch."""
    m = mixing(cutmix_alpha=0.0)   # Mixup only: every pixel moves
    images, _ = step_inputs(0)
    x, _ = mixed_by_micro_batches(m, 0, 1)
    lam = float(m.plan(0, 0).lam[0])
    assert lam != 1.0 and not torch.equal(x[0], images[0])
    assert torch.allclose(x[0], images[0] * lam + images[E - 1] * (1 - lam))


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_over_the_whole_effective_batch_it_is_timms_own_mixup(mode, alphas):
    m = mixing(mixup_mode=mode, mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
    for step in range(4):
        ours, targets = mixed_by_micro_batches(m, step, E)
        images, labels = step_inputs(step)
        np.random.seed(np.random.SeedSequence([7, 0, step, 0x4D495855]).generate_state(1)[0])
        timm_mix = Mixup(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], mode=mode, label_smoothing=0.1,
                         num_classes=CLASSES)
        theirs, their_targets = timm_mix(images.clone(), labels)
        assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(targets, their_targets, atol=1e-6)


def test_the_plan_is_a_function_of_seed_epoch_and_step_and_leaves_numpy_alone():
    m = mixing(mixup_mode="elem")
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = m.plan(2, 5)
    assert np.array_equal(np.random.get_state()[1], before)   # the global generator is put back
    again = mixing(mixup_mode="elem")._draw(2, 5)
    assert np.array_equal(a.lam, again.lam) and np.array_equal(a.boxes, again.boxes)
    assert not np.array_equal(a.lam, m.plan(2, 6).lam) and not np.array_equal(a.lam, m.plan(3, 5).lam)
    other_seed = Mixing(settings(mixup_mode="elem"), seed=8, E=E, size=SIZE, num_classes=CLASSES, smoothing=0.1)
    assert not np.array_equal(a.lam, other_seed.plan(2, 5).lam)


def test_an_unreadable_partner_is_not_mixed_in():
    m = mixing(cutmix_alpha=0.0)
    images, labels = step_inputs(0)
    plan = m.plan(0, 0)
    x = images[:2].clone()
    lam = m.mix(plan, [0, 1], x, images[[E - 1, E - 2]], torch.tensor([False, True]))
    assert lam[0] == 1.0 and torch.equal(x[0], images[0]) and lam[1] == float(plan.lam[1])
    t = m.targets(labels[:2], labels[[E - 1, E - 2]], lam)
    assert torch.allclose(t.sum(1), torch.ones(2)) and t[0, labels[0]] == pytest.approx(1 - 0.1 + 0.1 / CLASSES)


def test_soft_cross_entropy_is_the_usual_loss_for_hard_targets():
    logits = torch.randn(4, CLASSES)
    labels = torch.tensor([0, 1, 2, 4])
    hard = torch.nn.functional.one_hot(labels, CLASSES).float()
    assert torch.allclose(soft_cross_entropy(logits, hard), torch.nn.functional.cross_entropy(logits, labels,
                                                                                              reduction="none"))


# ---- real worker runs ------------------------------------------------------------------------------------------
MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_mode": "pair"}
LADDER = [{"device": "cpu", "batch_size": 8}, {"device": "cpu", "batch_size": 1}]   # E = 16: 8 x 2, then 1 x 16


def mix_run(tmp_path, dataset, name, **sections):
    return make_run(tmp_path, name, config_text(name, dataset, augment=MIX, profiles=LADDER, **sections))


@pytest.fixture(scope="module")
def mixed_reference(tmp_path_factory, dataset):
    """An uninterrupted Mixup/CutMix run on rung 1 (batch 8 x accum 2), in-process loading."""
    run_dir = mix_run(tmp_path_factory.mktemp("mixref"), dataset, "mixref")
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    return run_dir


def test_a_mixed_run_killed_and_resumed_with_loader_processes_ends_bit_identical(tmp_path, dataset, mixed_reference):
    """Killed mid-step, resumed with 2 loader processes (each loads its micro-batches' partners itself)."""
    run_dir = mix_run(tmp_path, dataset, "mixkill")
    assert run_worker(run_dir, faults="train_step:sigkill@8:once").returncode == -signal.SIGKILL
    frozen = run_dir / "config.toml"
    assert "num_workers = 0" in frozen.read_text()   # rung 1's, written first
    frozen.write_text(frozen.read_text().replace("num_workers = 0", "num_workers = 2", 1))
    result = run_worker(run_dir, attempt=2)
    assert result.returncode == ExitCode.OK and "resumed from" in result.stdout, result.stdout + result.stderr
    assert_same_weights(run_dir, mixed_reference)


def test_a_mixed_run_moved_to_batch_1_mixes_the_same_pairs(tmp_path, dataset, mixed_reference):
    """Killed at step 15 on batch 8 x 2, finished on batch 1 x 16 (each image's partner loaded beside it): equal to
    the uninterrupted run up to float summation order. With timm's pairing inside each micro-batch, batch 1 would mix
    every image with itself and the weights would differ by far more."""
    run_dir = mix_run(tmp_path, dataset, "mixswitch")
    assert run_worker(run_dir, faults="train_step:sigkill@15:once").returncode == -signal.SIGKILL
    result = run_worker(run_dir, rung=2, attempt=2)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "batch 1 x accum 16" in result.stdout
    diff = max_weight_difference(run_dir / "model.safetensors", mixed_reference / "model.safetensors")
    print(f"max abs weight difference after the switch to batch 1: {diff:.3e}")
    assert 0 < diff < 1e-5   # not bit-identical (another summation order), and not another training


# ---- config ---------------------------------------------------------------------------------------------------
def load(tmp_path, dataset, train=None, **augment):
    from trainctl.contract import config as configlib
    path = tmp_path / "run.toml"
    path.write_text(config_text("mixcfg", dataset, augment=augment, train=train or {}))
    return configlib.load(path)


@pytest.mark.parametrize("augment,train,words", [
    ({"mixup_alpha": -1.0}, None, "[augment] mixup_alpha"),
    ({"cutmix_alpha": 101.0}, None, "[augment] cutmix_alpha"),
    ({"mixup_alpha": 0.8, "mixup_prob": 1.5}, None, "[augment] mixup_prob"),
    ({"mixup_alpha": 0.8, "mixup_switch_prob": -0.1}, None, "[augment] mixup_switch_prob"),
    ({"mixup_alpha": 0.8, "mixup_mode": "batches"}, None, "[augment] mixup_mode"),
    ({"cutmix_minmax": [0.8, 0.2]}, None, "[augment] cutmix_minmax"),
    ({"cutmix_minmax": [0.2]}, None, "cutmix_minmax must be a list of 2 values"),
    ({"mixup_alpha": 0.8}, {"effective_batch_size": 15}, "[train] effective_batch_size"),
])
def test_bad_mixing_values_are_one_line_naming_the_key(tmp_path, dataset, augment, train, words):
    from trainctl.contract.config import ConfigError
    with pytest.raises(ConfigError) as err:
        load(tmp_path, dataset, train, **augment)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_mixing_is_part_of_the_identity_only_when_on(tmp_path, dataset):
    from trainctl.contract import config as configlib
    off, on = load(tmp_path, dataset), load(tmp_path, dataset, mixup_alpha=0.8, cutmix_alpha=1.0)
    assert "mixup_alpha" not in fixed.identity(off)
    assert fixed.identity(on)["mixup_alpha"] == 0.8 and fixed.identity(on)["mixup_mode"] == "batch"
    assert fixed.resume_changes(on, off)[0].startswith("[augment] mixup_alpha: 0.8 → None")
    assert not configlib.mixing_on(off.augment) and configlib.mixing_on(on.augment)
