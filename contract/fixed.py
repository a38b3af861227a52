"""The settings an unfinished run's checkpoints fix: `identity` (the worker refuses a checkpoint when one of them
differs) and what a resume with an edited config may not change (`resume_changes`, `trainctl resume --config`).

Standard library only, as config.py: the CLI checks an edited config without importing torch.
"""
from __future__ import annotations

from .config import Config, mixing_on


def identity(c: Config) -> dict:
    """The settings a checkpoint is only valid for: resuming with any of them changed is refused."""
    return {"model": c.model.name, "img_size": c.model.img_size, "pretrained": c.model.pretrained,
            "weights": c.model.weights, "train_dir": str(c.data.train_dir), "seed": c.run.seed,
            "epochs": c.train.epochs, "effective_batch_size": c.train.effective_batch_size,
            "lr": c.train.lr, "opt": c.train.opt, "weight_decay": c.train.weight_decay,
            "sched": c.train.sched, "warmup_epochs": c.train.warmup_epochs, "min_lr": c.train.min_lr,
            "label_smoothing": c.train.label_smoothing, "grad_clip": c.train.grad_clip,
            "crop_scale": list(c.data.crop_scale), "crop_ratio": list(c.data.crop_ratio),
            "hflip": c.data.hflip, **{k: v for k, v in _recipe(c).items() if v}}


def _recipe(c: Config) -> dict:
    """Fine-tuning settings added after runs had checkpoints. In `identity` only when on (not 0, not unset): a
    checkpoint written before they existed (so with them off) still resumes; one made with them on refuses a
    resume without them, or with other values."""
    return {"drop_path_rate": c.model.drop_path_rate, "drop_rate": c.model.drop_rate,
            "layer_decay": c.train.layer_decay, **_ema(c), **_augment(c)}


def _augment(c: Config) -> dict:
    """[augment] as the checkpoints fix it: each augmentation when on; the erasing mode and count only with erasing on."""
    a = c.augment
    erasing, mixing = a.re_prob > 0, mixing_on(a)
    return {"auto_augment": a.auto_augment, "color_jitter": a.color_jitter, "re_prob": a.re_prob,
            "re_mode": a.re_mode if erasing else None, "re_count": a.re_count if erasing else None,
            **({"mixup_alpha": a.mixup_alpha, "cutmix_alpha": a.cutmix_alpha,
                "cutmix_minmax": list(a.cutmix_minmax) if a.cutmix_minmax else None, "mixup_prob": a.mixup_prob,
                "mixup_switch_prob": a.mixup_switch_prob, "mixup_mode": a.mixup_mode} if mixing else {})}


def _ema(c: Config) -> dict:
    """[ema] as the checkpoints fix it: on or off, and when on its decay and warmup (the EMA weights in a checkpoint
    are a function of them). Its device is not: like the rung's, it may change on resume."""
    on = c.ema.enabled
    return {"ema": on, "ema_decay": c.ema.decay if on else None, "ema_warmup": c.ema.warmup if on else None}


# The settings an unfinished run's checkpoints fix, and where each lives in the TOML file: `identity` (the
# worker refuses a checkpoint when one differs), [data] extensions and val_split (they choose the training set,
# which the checkpoint also fixes: manifest.py) and [train] warmup_lr (the checkpoint's own scheduler state
# keeps the old value: a new one would be ignored without a word). An exact run's data order, augmentations and learning-rate
# schedule are functions of these. Everything else may change on resume: the ladder ([[profiles]]),
# [supervisor], [checkpoint], [logging], [data] val_dir and max_image_pixels, log_every_steps, threads, deterministic,
# [ema] device.
FIXED_ON_RESUME = {
    "model": "[model] name", "img_size": "[model] img_size", "pretrained": "[model] pretrained",
    "drop_path_rate": "[model] drop_path_rate", "drop_rate": "[model] drop_rate", "layer_decay": "[train] layer_decay",
    "weights": "[model] weights", "train_dir": "[data] train_dir", "crop_scale": "[data] crop_scale",
    "crop_ratio": "[data] crop_ratio", "hflip": "[data] hflip", "seed": "[run] seed", "epochs": "[train] epochs",
    "effective_batch_size": "[train] effective_batch_size", "lr": "[train] lr", "opt": "[train] opt",
    "weight_decay": "[train] weight_decay", "sched": "[train] sched", "warmup_epochs": "[train] warmup_epochs",
    "warmup_lr": "[train] warmup_lr", "min_lr": "[train] min_lr", "label_smoothing": "[train] label_smoothing",
    "grad_clip": "[train] grad_clip", "extensions": "[data] extensions", "val_split": "[data] val_split",
    "ema": "[ema] enabled", "ema_decay": "[ema] decay", "ema_warmup": "[ema] warmup",
    "auto_augment": "[augment] auto_augment", "color_jitter": "[augment] color_jitter", "re_prob": "[augment] re_prob",
    "re_mode": "[augment] re_mode", "re_count": "[augment] re_count",
    **{key: f"[augment] {key}" for key in ("mixup_alpha", "cutmix_alpha", "cutmix_minmax", "mixup_prob",
                                           "mixup_switch_prob", "mixup_mode")},
}


def fixed_on_resume(c: Config) -> dict:
    """The values of the settings in FIXED_ON_RESUME."""
    return {**identity(c), **_recipe(c), "warmup_lr": c.train.warmup_lr, "extensions": list(c.data.extensions),
            "val_split": c.data.val_split}


def resume_changes(frozen: Config, edited: Config) -> list[str]:
    """'[train] epochs: 3 → 2' for each setting fixed by the run's checkpoints that `edited` changes."""
    before, after = fixed_on_resume(frozen), fixed_on_resume(edited)
    keys = list(FIXED_ON_RESUME) + sorted((before.keys() | after.keys()) - FIXED_ON_RESUME.keys())
    return [f"{FIXED_ON_RESUME.get(key, key)}: {before.get(key)!r} → {after.get(key)!r}"
            for key in keys if before.get(key) != after.get(key)]
