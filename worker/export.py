"""The finished model: ``model.safetensors`` (timm state_dict) and ``labels.json``, written atomically."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from trainctl.contract import fsio
from trainctl.contract.protocol import CannotContinue, Phase
from trainctl.contract.runfolder import LABELS_FILE, MODEL_FILE

from .report import say


def write(t) -> None:
    """Export trainer `t`'s weights, loadable with safetensors.torch.load_file into timm.create_model."""
    t.reporter.beat(Phase.EXPORTING, force=True)
    # Training is over and its last checkpoint is committed: free the optimizer's moments (twice the
    # model's size with AdamW) so that the export is not the night's memory peak.
    t.optimizer.state.clear()
    state = t.model.state_dict()
    refuse_nonfinite(state, t.progress.step)
    metadata = {"model": t.cfg.model.name, "num_classes": str(len(t.train_set.classes)),
                "img_size": str(t.recipe.size), "step": str(t.progress.step)}
    path = t.run_dir / MODEL_FILE
    fsio.atomic_write_by_name(path, lambda tmp: save_file(_exportable(state), str(tmp), metadata=metadata))
    classes = list(t.train_set.classes)
    fsio.atomic_write_json(t.run_dir / LABELS_FILE, {
        "classes": classes, "index_to_class": {str(i): c for i, c in enumerate(classes)}})
    final = t.history[-1]["val_acc"] if t.history else None
    t.reporter.beat(Phase.DONE, force=True, final_model=str(path), val_acc=final)
    say(f"finished: {path}" + (f" (validation top-1 {final:.3f})" if final is not None else ""))


def refuse_nonfinite(state: dict, step: int) -> None:
    """A model with a NaN or an infinity in it is not a result: the run has diverged (CannotContinue)."""
    bad = [name for name, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CannotContinue("diverged", (
            f"at the end of training (step {step}) {len(bad)} of the model's {len(state)} tensors are not "
            f"finite ({shown}); no model exported. Fix: start a new run (another [run] name) with a lower "
            f"[train] lr or with [train] grad_clip set"))


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
