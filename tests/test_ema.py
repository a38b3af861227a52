"""[ema] (issue 18): timm's ModelEmaV3, updated once per optimizer step with the run's step count, kept on the CPU
or beside the model, in every checkpoint, validated beside the raw model, exported as model_ema.safetensors; a run
killed and resumed ends with both bit-identical to an uninterrupted one, and another rung agrees to float summation."""
from __future__ import annotations

import io
import json
import shutil
import signal
import types
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, config_text, make_run, max_weight_difference, run_worker, weights
from rich.console import Console

from trainctl.contract import config as configlib
from trainctl.contract import fixed
from trainctl.contract import tomlout
from trainctl.contract.config import ConfigError
from trainctl.contract.protocol import ExitCode, read_heartbeat
from trainctl.contract.runfolder import METRICS_FILE, REPORT_FILE, REPORT_JSON, committed_checkpoints
from trainctl.supervisor import report
from trainctl.supervisor.status import gather
from trainctl.supervisor.view import render_status
from trainctl.worker import checkpoint
from trainctl.worker.export import EMA_MODEL_FILE
from trainctl.worker.model import build_ema, build_model, ema_device
from trainctl.worker.snapshot import check_identity, restore_ema, shares_training_memory
from trainctl.worker.tensorboard_log import Board

DECAY = 0.8   # with warmup, the decay 1 - k^(-2/3) of step k reaches it at step 12 of 18: both parts are used
EMA = {"enabled": True, "decay": DECAY, "warmup": True, "device": "cpu"}
EVERY_STEP = {"every_steps": 1, "keep_last": 30}   # every step's checkpoint kept: the EMA's update checked at each


def ema_text(name: str, dataset, ema: dict | None = None, **sections) -> str:
    """The tests' config with an [ema] table (`config_text` knows only the sections of the demo's small run)."""
    return config_text(name, dataset, **sections) + ("\n" + tomlout.dumps({"ema": ema}) if ema is not None else "")


def load(tmp_path: Path, dataset, ema: dict | None = None) -> configlib.Config:
    path = tmp_path / "ema.toml"
    path.write_text(ema_text("ema", dataset, ema))
    return configlib.load(path)


# ---- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,words", [
    ("decay", 0, "above 0 and below 1"), ("decay", 1.0, "above 0 and below 1"), ("decay", 1.5, "above 0 and below 1"),
    ("decay", -0.1, "above 0 and below 1"), ("decay", "0.999", "must be a number"),
    ("device", "mps", '"same" keeps the EMA beside the model, "cpu" keeps it in CPU memory'),
    ("enabled", "yes", "must be true or false"), ("warmup", 1, "must be true or false")])
def test_a_bad_value_is_one_line_naming_the_key_and_the_fix(tmp_path, dataset, key, value, words):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, dataset, ema={key: value})
    message = str(err.value)
    assert f"[ema] {key}" in message or f"[ema].{key}" in message, message
    assert words in message and "\n" not in message
    assert "Fix:" in message or "must be true or false" in message   # the type errors of every bool key say no more


def test_off_by_default_and_the_frozen_copy_keeps_the_settings(tmp_path, dataset):
    plain = load(tmp_path, dataset)
    assert plain.ema == configlib.EmaSection(enabled=False, decay=0.9998, warmup=False, device="same")
    on = load(tmp_path, dataset, ema=EMA)
    frozen = tmp_path / "frozen.toml"
    frozen.write_text(configlib.to_toml(on))
    assert configlib.load(frozen).ema == configlib.EmaSection(True, DECAY, True, "cpu")


def test_the_settings_are_in_the_identity_only_when_on_and_turning_ema_on_is_refused(tmp_path, dataset):
    plain, on = load(tmp_path, dataset), load(tmp_path, dataset, ema=EMA)
    # Off: the identity of a checkpoint written before [ema] existed, so such a checkpoint still resumes.
    assert not {"ema", "ema_decay", "ema_warmup"} & fixed.identity(plain).keys()
    assert {k: fixed.identity(on)[k] for k in ("ema", "ema_decay", "ema_warmup")} == \
        {"ema": True, "ema_decay": DECAY, "ema_warmup": True}
    # `trainctl resume --config` (the supervisor, before a worker starts) and the worker's own check both refuse.
    assert fixed.resume_changes(plain, on) == ["[ema] enabled: False → True", f"[ema] decay: None → {DECAY}",
                                                   "[ema] warmup: None → True"]
    with pytest.raises(ConfigError) as err:
        check_identity(fixed.identity(plain), fixed.identity(on), tmp_path)
    assert "ema: checkpoint null vs now true" in str(err.value) and "start a new run" in str(err.value)
    # The device may change on resume (like the rung's): it is not part of what the checkpoints fix.
    same = load(tmp_path, dataset, ema={**EMA, "device": "same"})
    assert fixed.resume_changes(on, same) == [] and fixed.identity(on) == fixed.identity(same)
    # A checkpoint without EMA weights, whatever its identity says, is never resumed into an EMA run.
    with pytest.raises(ConfigError, match=r"holds no EMA weights but \[ema\] enabled = true"):
        restore_ema(types.SimpleNamespace(ema=object()), {"model": {}})


# ---- where it lives ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["cpu", "same"])
def test_the_ema_is_copied_on_the_cpu_and_lives_where_device_says(tmp_path, dataset, where):
    """The meta device stands for an accelerator: "cpu" keeps the EMA in CPU memory (its updates bring the model's
    values over, tensor by tensor), "same" puts it beside the model (one fused update). An EMA on the CPU is shared
    with a background checkpoint write like CPU training is, so the update waits until the writer has read it."""
    cfg = load(tmp_path, dataset, ema={**EMA, "device": where})
    model = build_model(cfg, 4)
    ema = build_ema(cfg, model, torch.device("meta"))
    assert ema_device(ema).type == ("cpu" if where == "cpu" else "meta")
    assert all(p.device.type == "cpu" for p in model.parameters())   # the copy was made before the model moved
    assert ema.foreach == (where == "same") and ema.decay == DECAY and ema.use_warmup
    trainer = types.SimpleNamespace(device=torch.device("meta"), ema=ema)
    assert shares_training_memory(trainer) == (where == "cpu")
    assert build_ema(load(tmp_path, dataset), model, torch.device("cpu")) is None   # off


def test_the_checkpoint_bound_counts_the_ema_weights():
    state = {"w": torch.zeros(1000)}
    assert checkpoint.size_bound(state, extra=state) == checkpoint.size_bound(state) + 4000


def test_the_rounding_generator_is_restored_only_into_one_of_its_kind():
    """ModelEmaV3's stochastic-rounding generator: its state comes back on the same device type; a checkpoint from
    another one (a CUDA generator's state does not fit a CPU one) leaves it as built; timm without one is fine."""
    from timm.utils import ModelEmaV3

    from trainctl.worker.snapshot import capture_ema
    source = ModelEmaV3(torch.nn.Linear(3, 2))
    source._sr_generator.manual_seed(11)
    saved = capture_ema(source)
    assert saved["rounding_device"] == "cpu"
    target = types.SimpleNamespace(ema=ModelEmaV3(torch.nn.Linear(3, 2)))
    restore_ema(target, {"ema": saved})
    assert torch.equal(target.ema._sr_generator.get_state(), source._sr_generator.get_state())
    built = target.ema._sr_generator.manual_seed(5).get_state()
    restore_ema(target, {"ema": {**saved, "rounding_device": "cuda"}})
    assert torch.equal(target.ema._sr_generator.get_state(), built)
    del target.ema._sr_generator   # an older timm's ModelEmaV3
    restore_ema(target, {"ema": saved})
    assert capture_ema(target.ema)["rounding_rng"] is None


def test_tensorboard_shows_the_ema_beside_the_raw_model():
    written = {}
    writer = types.SimpleNamespace(add_scalar=lambda tag, value, step: written.update({tag: (value, step)}),
                                   flush=lambda: None)
    Board(writer).val({"step": 6, "val_acc": 0.5, "val_loss": 1.0, "ema_val_acc": 0.75, "ema_val_loss": 0.6})
    assert written == {"val/accuracy": (0.5, 6), "val/loss": (1.0, 6), "val_ema/accuracy": (0.75, 6),
                       "val_ema/loss": (0.6, 6)}


# ---- real runs -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whole(tmp_path_factory, dataset) -> Path:
    """An uninterrupted run with the EMA on the CPU (rung 1: batch 8 x accum 2), a checkpoint at every step."""
    tmp = tmp_path_factory.mktemp("ema-whole")
    run_dir = make_run(tmp, "whole", ema_text("whole", dataset, EMA, checkpoint=EVERY_STEP))
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    return run_dir


def expected_decay(step: int) -> float:
    """ModelEmaV3's decay at optimizer step `step` (1 = the first) with use_warmup (gamma 1, power 2/3)."""
    return 0.0 if step <= 1 else min(1 - step ** (-2 / 3), DECAY)


def test_the_ema_moves_once_per_optimizer_step_with_the_decay_of_the_run_step(whole):
    """From each step's checkpoint: EMA(k) = lerp(EMA(k-1), weights(k), 1 - decay(k)), bit for bit. Per micro-batch
    updates (2 per step here), or a decay counted from the process's own updates, would not give this."""
    found = {c.step: c for c in committed_checkpoints(whole / "checkpoints")}
    assert sorted(found) == list(range(1, 19))
    states = {k: torch.load(c.path, map_location="cpu", weights_only=True) for k, c in found.items()}
    first = states[1]["ema"]["state"]
    assert all(torch.equal(first[f"module.{k}"], v) for k, v in states[1]["model"].items())   # step 1: a copy
    for k in range(2, 19):
        before, after, model = states[k - 1]["ema"]["state"], states[k]["ema"]["state"], states[k]["model"]
        names = list(model)
        want = [before[f"module.{n}"].clone() for n in names]
        torch._foreach_lerp_(want, [model[n] for n in names], weight=1.0 - expected_decay(k))
        assert all(torch.equal(w, after[f"module.{n}"]) for w, n in zip(want, names)), k
        assert states[k]["ema"]["rounding_rng"].dtype == torch.uint8
    model_bytes = sum(v.numel() * v.element_size() for v in states[18]["model"].values())
    size = found[18].marker["size"]
    assert 3.5 * model_bytes < size <= checkpoint.size_bound(states[18]["model"], extra=states[18]["model"])


def val_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [r for r in lines if r["kind"] == "val"]


def test_validated_every_epoch_shown_in_status_and_report_and_exported_for_timm(whole):
    import timm
    lines = val_lines(whole)
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert all(0 <= r["ema_val_acc"] <= 1 and r["ema_val_loss"] > 0 for r in lines)
    assert all("ema_val_top5" not in r and "val_top5" not in r for r in lines)   # 4 classes: no top-5
    last = lines[-1]
    assert read_heartbeat(whole).ema_val_acc == last["ema_val_acc"]
    st = gather(whole)
    assert st.metrics["ema_val_acc"] == [r["ema_val_acc"] for r in lines] and st.ema_val_acc == last["ema_val_acc"]
    assert st.to_json()["ema_val_acc"] == last["ema_val_acc"]
    console = Console(file=io.StringIO(), width=200)
    console.print(render_status(st))
    assert f"ema val acc  {last['ema_val_acc']:.3f}" in console.file.getvalue()
    report.write(whole, "succeeded", None, last["val_acc"])
    assert (f"- final validation accuracy: {last['val_acc']:.1%}; EMA of the weights: {last['ema_val_acc']:.1%}"
            in (whole / REPORT_FILE).read_text())
    assert json.loads((whole / REPORT_JSON).read_text())["ema_val_acc"] == last["ema_val_acc"]

    raw, ema = weights(whole / "model.safetensors"), weights(whole / EMA_MODEL_FILE)
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    model = timm.create_model("test_vit", num_classes=4, img_size=32)
    timm.models.load_checkpoint(model, str(whole / EMA_MODEL_FILE), strict=True)
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def killed(tmp_path_factory, dataset) -> tuple[Path, Path]:
    """The same run SIGKILLed at step 14 (its newest checkpoint: step 14), and a copy of its folder as it was left."""
    tmp = tmp_path_factory.mktemp("ema-killed")
    run_dir = make_run(tmp, "killed", ema_text("killed", dataset, EMA, checkpoint=EVERY_STEP))
    assert run_worker(run_dir, faults=f"train_step:sigkill@{KILLED_AT}").returncode == -signal.SIGKILL
    return run_dir, Path(shutil.copytree(run_dir, tmp / "switched"))


KILLED_AT = 14


def test_killed_and_resumed_the_raw_and_ema_weights_end_bit_identical(killed, whole):
    """Resumed on its rung with the EMA on the CPU: both files equal the uninterrupted run's, bit for bit (the
    warmup's decay follows the run's step, not the resumed process's count of updates)."""
    run_dir, _ = killed
    resumed = run_worker(run_dir, attempt=2)
    assert resumed.returncode == ExitCode.OK, resumed.stdout + resumed.stderr
    assert f"resumed from step-{KILLED_AT:09d}.pt" in resumed.stdout
    assert_same_weights(whole, run_dir)
    a, b = weights(whole / EMA_MODEL_FILE), weights(run_dir / EMA_MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert f"EMA of the weights: {run_dir / EMA_MODEL_FILE}" in resumed.stdout
    assert val_lines(run_dir)[-1]["ema_val_acc"] == val_lines(whole)[-1]["ema_val_acc"]


def test_switching_rung_gives_the_same_ema_up_to_float_summation_order(killed, whole):
    """Resumed on rung 2 (batch 4 x accum 4 instead of 8 x 2): the same optimizer steps, so the same EMA updates;
    the EMA agrees with the uninterrupted run's as closely as the raw weights do."""
    _, run_dir = killed
    result = run_worker(run_dir, rung=2, attempt=2)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "batch 4 x accum 4" in result.stdout
    for name in ("model.safetensors", EMA_MODEL_FILE):
        diff = max_weight_difference(whole / name, run_dir / name)
        print(f"{name}: max abs difference after {18 - KILLED_AT} steps on the other rung: {diff:.3e}")
        assert diff < 1e-5
