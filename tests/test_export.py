"""The finished model in timm's own format: `timm.create_model("local-dir:<run>/model", pretrained=True)` in a fresh
process rebuilds it at its size with its weights, and timm's own eval transform from `resolve_data_config(model=m)`
reproduces the run's validation accuracy; the folder is written whole or not at all."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import config_text, make_run, run_worker, weights

from trainctl.contract import config as configlib
from trainctl.contract.protocol import ExitCode
from trainctl.contract.runfolder import METRICS_FILE, MODEL_DIR, MODEL_FILE

KILLED = -signal.SIGKILL

# What a timm user writes, in a process that knows nothing of trainctl: the export, timm's eval transform, and a
# plain ImageFolder whose class index comes from the export's label_names.
LOAD_AND_EVALUATE = r"""
import json, sys
import timm, timm.data, torch, torch.nn.functional as F
from torchvision.datasets import ImageFolder
from safetensors.torch import load_file

folder, val_dir, smoothing = sys.argv[1], sys.argv[2], float(sys.argv[3])
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
labels = json.load(open(folder + "/config.json"))["label_names"]
data_config = timm.data.resolve_data_config(model=model)
images = ImageFolder(val_dir, transform=timm.data.create_transform(**data_config))
correct = total = 0
loss = 0.0
with torch.no_grad():
    for x, i in torch.utils.data.DataLoader(images, batch_size=8):
        y = torch.tensor([labels.index(images.classes[int(k)]) for k in i])
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
        loss += float(F.cross_entropy(logits, y, reduction="sum", label_smoothing=smoothing))
saved = load_file(folder + "/model.safetensors")
mine = model.state_dict()
print(json.dumps({"correct": correct, "total": total, "loss": loss / total, "num_classes": model.num_classes,
                  "data_config": data_config, "labels": labels,
                  "same_weights": saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in saved)}))
"""


def load_in_fresh_process(run_dir: Path, val_dir: Path, smoothing: float) -> dict:
    result = subprocess.run([sys.executable, "-c", LOAD_AND_EVALUATE, str(run_dir / MODEL_DIR), str(val_dir),
                             str(smoothing)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def final_validation(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("kind") == "val"][-1]


def trained_preprocessing(run_dir: Path) -> dict:
    """The run's validation recipe, as the worker builds it (worker.model.recipe_for), in timm's terms."""
    from trainctl.worker.export import data_config
    from trainctl.worker.model import build_model, recipe_for
    cfg = configlib.load(run_dir / "config.toml")
    return data_config(recipe_for(cfg, build_model(cfg, 4, load_weights=False)))


def assert_loads_as_trained(run_dir: Path, dataset, model: str, img_size: int) -> None:
    """The export, loaded by plain timm in a fresh process, is the run's model: its validation accuracy exactly."""
    folder = run_dir / MODEL_DIR
    assert (folder / MODEL_FILE).read_bytes() == (run_dir / MODEL_FILE).read_bytes()   # today's layout kept
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == model and cfg["num_classes"] == 4
    assert cfg["label_names"] == ["circle", "square", "stripes", "triangle"]
    got = load_in_fresh_process(run_dir, dataset[1], 0.0)
    assert got["same_weights"] and got["num_classes"] == 4
    want = trained_preprocessing(run_dir)
    assert tuple(got["data_config"]["input_size"]) == (3, img_size, img_size) == want["input_size"]
    for key in ("interpolation", "crop_pct", "crop_mode"):
        assert got["data_config"][key] == want[key], key
    for key in ("mean", "std"):
        assert tuple(got["data_config"][key]) == want[key], key
    val = final_validation(run_dir)
    assert got["total"] == 24
    assert got["correct"] / got["total"] == val["val_acc"]
    # The loss pins the logits, not just the argmax: the same weights on the same pixels (to float rounding).
    assert got["loss"] == pytest.approx(val["val_loss"], rel=1e-4)


def test_a_vit_at_another_size_loads_with_local_dir_even_after_a_crash_mid_export(tmp_path, dataset):
    """test_vit trained at 48 px (pos_embed of another size than the default): killed once its model folder is
    complete but not yet renamed, then finished by the next attempt; timm loads the folder and sees what the run saw."""
    run_dir = make_run(tmp_path, "vit", config_text("vit", dataset, model={"name": "test_vit", "img_size": 48},
                                                     train={"epochs": 2}))
    crashed = run_worker(run_dir, faults="export_written:sigkill:once")
    assert crashed.returncode == KILLED, crashed.stdout + crashed.stderr
    assert not (run_dir / MODEL_DIR).exists()     # never a half folder named model
    assert [p.name for p in run_dir.glob(".model.tmp-*")]   # the unfinished export is under its temporary name
    result = run_worker(run_dir, attempt=2)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert not list(run_dir.glob(".model.tmp-*"))   # the next export cleared what the crash left
    assert_loads_as_trained(run_dir, dataset, "test_vit", 48)


def test_a_cnn_loads_with_local_dir_at_its_trained_size(tmp_path, dataset):
    run_dir = make_run(tmp_path, "cnn", config_text("cnn", dataset, model={"name": "test_resnet", "img_size": 40},
                                                     train={"epochs": 1}))
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert_loads_as_trained(run_dir, dataset, "test_resnet", 40)


@pytest.fixture(scope="module")
def small_vit():
    import timm
    return timm.create_model("test_vit", img_size=40, num_classes=3)


def test_the_folder_is_timms_config_and_replaces_an_old_export_whole(tmp_path, small_vit):
    from trainctl.worker.export import write_folder
    from trainctl.worker.images import Recipe
    recipe = Recipe(size=40, interpolation="bilinear", crop_pct=0.9, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                    crop_mode="squash")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "stale.txt").write_text("an older export")
    (tmp_path / ".model.tmp-99999").mkdir()     # what a crashed export left
    before = os.umask(0o027)
    try:
        write_folder(small_vit, folder, ["a", "b", "c"], recipe, {"format": "pt"})
    finally:
        os.umask(before)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in folder.iterdir())
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "test_vit" and cfg["num_classes"] == 3 and cfg["label_names"] == ["a", "b", "c"]
    assert tuple(cfg["model_args"]["img_size"]) == (40, 40)    # what rebuilds pos_embed at the trained size
    pre = cfg["pretrained_cfg"]
    assert (pre["input_size"], pre["interpolation"], pre["crop_pct"], pre["crop_mode"], pre["mean"], pre["std"]) == (
        [3, 40, 40], "bilinear", 0.9, "squash", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    saved = weights(folder / "model.safetensors")
    assert saved.keys() == small_vit.state_dict().keys()


def test_a_failed_export_leaves_the_previous_folder_untouched(tmp_path, small_vit, monkeypatch):
    from trainctl.worker import export
    from trainctl.worker.images import Recipe
    folder = tmp_path / "model"
    export.write_folder(small_vit, folder, ["a", "b", "c"], Recipe(size=40), {})
    first = {p.name: p.read_bytes() for p in folder.iterdir()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "save_config_for_hf", fail)
    with pytest.raises(OSError):
        export.write_folder(small_vit, folder, ["x", "y", "z"], Recipe(size=40), {})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
