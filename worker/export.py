"""The finished model, written atomically: ``model/`` in timm's own format (``config.json`` beside
``model.safetensors``: ``timm.create_model("local-dir:<run>/model", pretrained=True)`` rebuilds it, at its size,
with its weights and its preprocessing), and today's ``model.safetensors`` + ``labels.json`` beside it; with [ema] on,
``model_ema.safetensors`` too (the EMA's weights, the same format)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf   # what timm.models.save_for_hf / push_to_hf_hub write

from trainctl.contract import fsio
from trainctl.contract.protocol import CannotContinue, Phase
from trainctl.contract.runfolder import LABELS_FILE, MODEL_DIR, MODEL_FILE

from .images import Recipe
from .report import say

CONFIG_NAME = "config.json"   # timm's (and the Hugging Face Hub's) name; the weights are MODEL_FILE, as timm names them
EMA_MODEL_FILE = "model_ema.safetensors"   # [ema] enabled: the EMA's weights, beside MODEL_FILE
OLD_MARK = "old-"             # ".model.tmp-old-<pid>": the export being replaced, for the moment between two renames


def write(t) -> None:
    """Export trainer `t`'s model: the timm folder, then the top-level weights (the EMA's first) and labels."""
    t.reporter.beat(Phase.EXPORTING, force=True)
    # Training is over and its last checkpoint is committed: free the optimizer's moments (twice the
    # model's size with AdamW) so that the export is not the night's memory peak.
    t.optimizer.state.clear()
    state = t.model.state_dict()
    refuse_nonfinite(state, t.progress.step)
    classes = list(t.train_set.classes)
    metadata = {"format": "pt", "model": t.cfg.model.name, "num_classes": str(len(classes)),
                "img_size": str(t.recipe.size), "step": str(t.progress.step)}
    folder = None
    try:
        folder = write_folder(t.model, t.run_dir / MODEL_DIR, classes, t.recipe, metadata, state=state,
                              on_written=lambda: t.faults.hit("export_written", t.progress.step))
    except OSError:
        raise   # a full disk is disk_full: the top-level file could not be written either
    except Exception as e:  # noqa: BLE001 — the timm folder is a convenience: a night's result must not fail for it
        # e.g. a timm older than the one whose save_config_for_hf takes data_config, or a model argument timm
        # cannot serialise. The weights and labels below are the result.
        say(f"could not write {MODEL_DIR}/ in timm's format ({type(e).__name__}: {e}); model.safetensors and "
            f"labels.json are written as before")
    # Before model.safetensors, the run's result: where that file is, so is this one.
    ema_path = write_ema(t, metadata) if getattr(t, "ema", None) is not None else None
    # Today's layout, for the users and tools that read it: the same bytes as the folder's weights.
    path = t.run_dir / MODEL_FILE
    if folder is not None:
        fsio.atomic_write_by_name(path, lambda tmp: shutil.copyfile(folder / MODEL_FILE, tmp))
    else:
        fsio.atomic_write_by_name(path, lambda tmp: save_file(_exportable(state), str(tmp), metadata=metadata))
    fsio.atomic_write_json(t.run_dir / LABELS_FILE, {
        "classes": classes, "index_to_class": {str(i): c for i, c in enumerate(classes)}})
    last = t.history[-1] if t.history else {}
    final, final_ema = last.get("val_acc"), last.get("ema_val_acc")
    t.reporter.beat(Phase.DONE, force=True, final_model=str(path), val_acc=final, ema_val_acc=final_ema)
    say(f"finished: {path}" + (f" (validation top-1 {final:.3f})" if final is not None else ""))
    if ema_path is not None:
        say(f"EMA of the weights: {ema_path}" + (f" (validation top-1 {final_ema:.3f})" if final_ema is not None else ""))
    if folder is not None:
        say(f"timm: timm.create_model(\"local-dir:{folder}\", pretrained=True)")


def write_ema(t, metadata: dict) -> Path:
    """The EMA's weights as EMA_MODEL_FILE beside MODEL_FILE: the same format (a timm state_dict of the same model,
    the same metadata), written atomically in the same way."""
    path = t.run_dir / EMA_MODEL_FILE
    state = t.ema.module.state_dict()
    fsio.atomic_write_by_name(path, lambda tmp: save_file(_exportable(state), str(tmp), metadata={**metadata, "ema": "1"}))
    return path


def refuse_nonfinite(state: dict, step: int) -> None:
    """A model with a NaN or an infinity in it is not a result: the run has diverged (CannotContinue)."""
    bad = [name for name, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CannotContinue("diverged", (
            f"at the end of training (step {step}) {len(bad)} of the model's {len(state)} tensors are not "
            f"finite ({shown}); no model exported. Fix: start a new run (another [run] name) with a lower "
            f"[train] lr or with [train] grad_clip set"))


def data_config(recipe: Recipe) -> dict:
    """The run's validation preprocessing in timm's terms: what `timm.data.resolve_data_config` reads back."""
    return {"input_size": (3, recipe.size, recipe.size), "interpolation": recipe.interpolation,
            "mean": tuple(recipe.mean), "std": tuple(recipe.std), "crop_pct": recipe.crop_pct,
            "crop_mode": recipe.crop_mode}


def write_folder(model: torch.nn.Module, folder: Path, classes: list[str], recipe: Recipe, metadata: dict,
                 state: dict | None = None, on_written: Callable[[], None] | None = None) -> Path:
    """`model` (as built by timm.create_model) as a timm folder at `folder`, which is replaced whole or not at all.

    Any model can be exported this way (an EMA copy too: another folder name). The folder is filled under a
    temporary name, made durable, then renamed: a crash never leaves a half folder named `folder`, and the
    next export clears what a crash left."""
    folder = Path(folder)
    remove_stale_folders(folder)
    tmp = fsio.temp_name_for(folder)
    os.mkdir(tmp)
    try:
        _fill(tmp, model, model.state_dict() if state is None else state, classes, recipe, metadata)
        if on_written:
            on_written()
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def remove_stale_folders(folder: Path) -> list[str]:
    """Delete what an interrupted export of `folder` left beside it (our temporary naming only); their names."""
    prefix = f".{folder.name}{fsio.TEMP_MARK}"   # fsio.temp_name_for's, and _replace_folder's ".model.tmp-old-<pid>"
    removed = []
    for entry in os.scandir(folder.parent):
        if not entry.name.startswith(prefix):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        removed.append(entry.name)
    return removed


def _fill(tmp: Path, model: torch.nn.Module, state: dict, classes: list[str], recipe: Recipe,
          metadata: dict) -> None:
    """Write the weights and timm's config.json into folder `tmp`, durably, with the umask's file mode."""
    # timm's save_for_hf writes model.state_dict() as it is; safetensors refuses shared storage (tied weights)
    # and device tensors, hence our own copy of the weights beside timm's config.
    fsio.write_by_name(tmp / MODEL_FILE, lambda p: save_file(_exportable(state), str(p), metadata=metadata))
    # timm writes the config: architecture, num_classes, the model_args that rebuild it (img_size for a ViT),
    # and a pretrained_cfg whose preprocessing is this run's validation transform.
    fsio.write_by_name(tmp / CONFIG_NAME, lambda p: save_config_for_hf(
        model, str(p), model_config={"label_names": list(classes)}, data_config=data_config(recipe)))
    fsio.fsync_dir(tmp)


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Rename the complete folder `tmp` onto `folder`. A rename cannot replace a folder that has files in it: the
    old export is first renamed aside (a crash in between leaves no `folder`, never a half one), then deleted."""
    old = folder.with_name(f".{folder.name}{fsio.TEMP_MARK}{OLD_MARK}{os.getpid()}")
    if os.path.lexists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsio.fsync_dir(folder.parent)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    elif os.path.lexists(old):
        os.unlink(old)


def _exportable(state: dict) -> dict:
    """CPU, contiguous tensors; a copy only where two entries share storage (tied weights), which
    safetensors refuses — not a copy of the whole model."""
    out, seen = {}, set()
    for name, v in state.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    return out
