"""The end-of-epoch validation: top-1, top-5 past 5 classes, and the mean loss, of the model and of its EMA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainctl.contract.protocol import Phase

from . import data
from . import device as devicelib
from .model import ema_device

TOP5_MIN_CLASSES = 5   # top-5 accuracy is reported past this many classes (with 5 or fewer it is always 100%)


def hits(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, k: int) -> int:
    """How many valid samples have their label among their `k` highest logits (k = 1: the argmax, as training counts)."""
    top = logits.argmax(1, keepdim=True) if k == 1 else logits.topk(k, dim=1).indices
    return int(((top == labels[:, None]).any(1) & valid).sum())


def scores_text(scores: dict, prefix: str) -> str:
    """'top-1 0.750, top-5 0.950, loss 0.6931' from validate's scores (prefix "ema_": the EMA's)."""
    top5 = f", top-5 {scores[prefix + 'val_top5']:.3f}" if prefix + "val_top5" in scores else ""
    return f"top-1 {scores[prefix + 'val_acc']:.3f}{top5}, loss {scores[prefix + 'val_loss']:.4f}"


def validate(t) -> dict:
    """Trainer `t`'s top-1 accuracy, mean loss and, past TOP5_MIN_CLASSES classes, top-5 accuracy on the validation
    images (bad images excluded): {"val_acc", "val_loss"[, "val_top5"]}. With [ema] on, the EMA's too, on the same
    micro-batches (decoded once) where it lives: the same keys prefixed "ema_". A rank of a group validates its
    share of the images; the sums are the group's."""
    t.reporter.beat(Phase.VALIDATING, force=True)
    b = t.profile.batch_size
    dataset = data.MicroBatches(t.val_set, t.recipe, t.cfg.run.seed, b, False)
    batches = data.iterate(dataset, data.eval_keys(len(t.val_set), b, t.group.share(b)), t.workers, t.cfg.run.seed,
                           t.device.type != "cpu")
    top5 = len(t.train_set.classes) > TOP5_MIN_CLASSES   # with 5 classes or fewer every label is in the top 5
    models = {"": (t.model, t.device)}
    if t.ema is not None:   # always in eval mode (ModelEmaV3 keeps it so)
        models["ema_"] = (t.ema.module, ema_device(t.ema))
    sums = {prefix: (0.0, 0, 0) for prefix in models}   # summed loss, top-1 hits, top-5 hits
    valid, bad = 0, []
    t.model.eval()
    with torch.no_grad():
        for mb in batches:
            t.reporter.bad_images(mb.bad)
            bad += mb.bad
            for prefix, (model, device) in models.items():
                scores = _evaluate(t, mb, 5 if top5 else 0, model, device)
                sums[prefix] = tuple(a + b for a, b in zip(sums[prefix], scores))
            valid += int(mb.valid.sum())
            t.reporter.beat()
    t.model.train()
    t.reporter.beat(Phase.TRAINING, force=True)
    if t.group.world > 1:   # each rank validated its share of the images: the sums over all of them
        flat = t.group.sum([x for prefix in sums for x in sums[prefix]] + [valid], t.device)
        sums = {prefix: tuple(flat[3 * i:3 * i + 3]) for i, prefix in enumerate(sums)}
        valid = int(flat[-1])
        t.reporter.bad_images([b for share in t.group.gather(bad) for b in share])   # rank 0 lists every rank's
    n = max(valid, 1)
    out = {}
    for prefix, (loss_sum, correct, correct5) in sums.items():
        out.update({f"{prefix}val_acc": correct / n, f"{prefix}val_loss": loss_sum / n,
                    **({f"{prefix}val_top5": correct5 / n} if top5 else {})})
    return out


def _evaluate(t, mb: data.MicroBatch, k: int, model: torch.nn.Module, device: torch.device) -> tuple[float, int, int]:
    """A validation micro-batch through `model` on `device`: summed loss, top-1 and top-k hits (0 when k = 0)
    over its valid samples. Plain labels whatever the training recipe: validation is never augmented nor mixed."""
    y, valid = mb.labels.to(device), mb.valid.to(device)
    x = t.inputs(mb, device)   # an EMA kept on the CPU is evaluated there
    with devicelib.autocast(t.profile, device):
        logits = model(x)
    losses = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=t.cfg.train.label_smoothing)
    return float((losses * valid).sum()), hits(logits, y, valid, 1), hits(logits, y, valid, k) if k else 0
