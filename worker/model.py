"""The model, its data recipe, optimizer and schedule — all from timm's own factories."""
from __future__ import annotations

import difflib
import logging

import timm
import timm.data
import timm.models
import timm.optim
import timm.scheduler
import torch
from timm.utils import ModelEmaV3

from trainctl.contract.config import Config, ConfigError

from .images import Recipe


def build_model(cfg: Config, num_classes: int, load_weights: bool = True) -> torch.nn.Module:
    """timm.create_model with the run's classes, image size and optional local weights.

    `load_weights=False` on resume: the checkpoint replaces every weight, so nothing is fetched.
    """
    name = cfg.model.name
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"[model] name = {name!r} is not a timm model.{hint} "
                          f"Fix: use a name that timm.list_models() lists.")
    kwargs: dict = {"num_classes": num_classes}
    if cfg.model.img_size:
        kwargs["img_size"] = cfg.model.img_size
    for key in DROP_KEYS:   # passed only when on: a model without them builds as it always did
        if getattr(cfg.model, key):
            kwargs[key] = getattr(cfg.model, key)
    pretrained = cfg.model.pretrained and load_weights
    if cfg.model.weights and load_weights:
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = _local_weights(name, cfg.model.weights)
    try:
        with _LoadReport() as report:
            model = _create(cfg, pretrained, kwargs)
    except (OSError, RuntimeError) as e:
        if pretrained and "pretrained_cfg_overlay" not in kwargs:
            raise ConfigError(f"[model] pretrained weights for {name!r} could not be fetched ({e}). "
                              f"Fix: download them once and set [model] weights = \"path/to/file\", "
                              f"or set pretrained = false.") from None
        if pretrained:
            raise ConfigError(f"[model] weights = {cfg.model.weights!r} does not fit {name!r} ({e}). "
                              f"Fix: use a weights file made for this architecture.") from None
        raise
    missing = [k for k in report.missing if not k.startswith(_classifiers(name))]
    if missing:   # timm loads non-strictly when it drops a head: an unrelated file would load nothing
        source = cfg.model.weights or "the pretrained weights"
        raise ConfigError(f"[model] {source} does not fit {name!r}: {len(missing)} weights are missing from it "
                          f"(e.g. {', '.join(missing[:3])}). Fix: use a weights file made for this architecture.")
    return model


DROP_KEYS = ("drop_path_rate", "drop_rate")   # [model] keys that timm.create_model takes as they are


def _create(cfg: Config, pretrained: bool, kwargs: dict) -> torch.nn.Module:
    """timm.create_model; a net that takes no img_size is built without one (convolutional nets take any size)."""
    name = cfg.model.name
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        for key in DROP_KEYS:
            if key in kwargs and f"'{key}'" in str(e):
                raise ConfigError(f"[model] {key} = {kwargs[key]!r}: {name!r} does not take it ({e}). Fix: remove "
                                  f"{key} (or set it to 0) for this model.") from None
        if "img_size" not in kwargs or "img_size" not in str(e):
            raise
        return _create(cfg, pretrained, {k: v for k, v in kwargs.items() if k != "img_size"})


class _LoadReport(logging.Handler):
    """Collects the keys timm reports missing while it loads pretrained weights."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self.logger = logging.getLogger("timm.models._builder")

    def __enter__(self):
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Missing keys ("):
            self.missing += [k.strip() for k in text[len("Missing keys ("):text.index(")")].split(",")]


def _classifiers(name: str) -> tuple[str, ...]:
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = (cfg.classifier if cfg else None) or "head"
    return tuple(f"{c}." for c in (classifier if isinstance(classifier, (list, tuple)) else [classifier]))


def _local_weights(name: str, path: str) -> dict:
    """timm's pretrained_cfg overlay that loads a local file; its head is kept if the classes match."""
    try:
        state_dict = timm.models.load_state_dict(path)   # weights_only for .pth, safetensors otherwise
    except Exception as e:
        raise ConfigError(f"[model] weights = {path!r} cannot be read ({type(e).__name__}: {e}). "
                          f"Fix: give a .safetensors or .pth state dict.") from None
    file_classes = 1000
    for prefix in _classifiers(name):
        weight = state_dict.get(f"{prefix}weight")
        if weight is not None:
            file_classes = int(weight.shape[0])
    # timm drops the classifier from the file when its class count differs from the model's.
    return {"state_dict": state_dict, "num_classes": file_classes}


def recipe_for(cfg: Config, model: torch.nn.Module) -> Recipe:
    """The model's own preprocessing (mean/std/interpolation/crop_pct) from timm, at our image size."""
    args = {"input_size": (3, cfg.model.img_size, cfg.model.img_size)} if cfg.model.img_size else {}
    data_cfg = timm.data.resolve_data_config(args, model=model)
    return Recipe(size=int(data_cfg["input_size"][-1]), interpolation=str(data_cfg["interpolation"]),
                  crop_pct=float(data_cfg["crop_pct"]), crop_scale=cfg.data.crop_scale,
                  crop_ratio=cfg.data.crop_ratio, hflip=cfg.data.hflip,
                  mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]),
                  max_pixels=cfg.data.max_image_pixels, crop_mode=str(data_cfg.get("crop_mode") or "center"))


def build_optimizer(cfg: Config, model: torch.nn.Module):
    """timm's optimizer factory (AdamW by default); the bias/norm weight-decay split is timm's, and so are the
    layer-decay groups: each holds an `lr_scale` that timm's schedulers multiply the scheduled LR by."""
    try:
        return timm.optim.create_optimizer_v2(model, opt=cfg.train.opt, lr=cfg.train.lr,
                                              weight_decay=cfg.train.weight_decay, layer_decay=cfg.train.layer_decay)
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"[train] opt = {cfg.train.opt!r} is not a timm optimizer ({e}). "
                          f"Fix: use e.g. 'adamw', 'sgd', 'lamb'.") from None


def build_ema(cfg: Config, model: torch.nn.Module, device: torch.device) -> ModelEmaV3 | None:
    """timm's ModelEmaV3 of `model` when [ema] is enabled (else None), kept on the training `device` or, with
    [ema] device = "cpu", in CPU memory. Call it while `model` is still on the CPU: the copy is made there, so an
    EMA kept on the CPU never passes through the accelerator's memory."""
    if not cfg.ema.enabled:
        return None
    where = torch.device("cpu") if cfg.ema.device == "cpu" else device
    # foreach (one fused lerp over all tensors) only where the EMA and the model share a device, as timm decides it;
    # `device` tells ModelEmaV3 where to bring the model's values for each update.
    ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup,
                     device=where if where.type == "cpu" else None, foreach=where == device)
    ema.module.to(where)
    return ema


def ema_device(ema: ModelEmaV3) -> torch.device:
    """Where the EMA's weights live."""
    return next(ema.module.parameters()).device


def scheduled_lr(optimizer) -> float:
    """The learning rate the schedule sets now: the top layer's (lr_scale 1); layer decay scales the others down."""
    group = max(optimizer.param_groups, key=lambda g: g.get("lr_scale", 1.0))
    return float(group["lr"]) / group.get("lr_scale", 1.0)


def build_scheduler(cfg: Config, optimizer, total_steps: int, warmup_steps: int):
    """timm's scheduler factory, counted in optimizer steps so every rung follows one schedule."""
    try:
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=cfg.train.sched, num_epochs=total_steps, warmup_epochs=warmup_steps,
            warmup_lr=cfg.train.warmup_lr, min_lr=cfg.train.min_lr,
            step_on_epochs=False, updates_per_epoch=1)
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"[train] sched = {cfg.train.sched!r} is not usable ({e}). "
                          f"Fix: use e.g. 'cosine', 'step', 'poly'.") from None
    if scheduler is None:
        raise ConfigError(f"[train] sched = {cfg.train.sched!r} is not a timm scheduler. Fix: use e.g. 'cosine'.")
    return scheduler
