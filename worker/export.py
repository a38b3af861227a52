"""The finished model: ``model.safetensors`` (timm state_dict) and ``labels.json``, written atomically."""
from __future__ import annotations

from safetensors.torch import save as safetensors_bytes

from . import fsio
from .protocol import LABELS_FILE, MODEL_FILE
from .report import say


def write(t) -> None:
    """Export trainer `t`'s weights, loadable with safetensors.torch.load_file into timm.create_model."""
    t.reporter.beat("exporting", force=True)
    # Cloned and contiguous: safetensors refuses tensors that share storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in t.model.state_dict().items()}
    metadata = {"model": t.cfg.model.name, "num_classes": str(len(t.train_set.classes)),
                "img_size": str(t.recipe.size), "step": str(t.progress.step)}
    fsio.atomic_write(t.run_dir / MODEL_FILE, safetensors_bytes(tensors, metadata=metadata))
    classes = list(t.train_set.classes)
    fsio.atomic_write_json(t.run_dir / LABELS_FILE, {
        "classes": classes, "index_to_class": {str(i): c for i, c in enumerate(classes)}})
    final = t.history[-1]["val_acc"] if t.history else None
    t.reporter.beat("done", force=True, final_model=str(t.run_dir / MODEL_FILE), val_acc=final)
    say(f"finished: {t.run_dir / MODEL_FILE}" + (f" (validation top-1 {final:.3f})" if final is not None else ""))
