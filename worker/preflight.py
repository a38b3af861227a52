"""The pre-flight, ``python -m trainctl.worker --check-config FILE``: what only torch and timm can tell about a
config (model name, devices, weights file, optimizer, scheduler, the TensorBoard package), checked before
`trainctl start` makes a run folder. One line and `ExitCode.CONFIG_ERROR` for the first problem found, else 0; it writes nothing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from trainctl.contract.config import ConfigError, load
from trainctl.contract.protocol import WORKER_ENV, ExitCode


def check_config(path: Path) -> int:
    """The pre-flight: one line and `ExitCode.CONFIG_ERROR` for the first problem found, else 0."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    try:
        cfg = load(path)
        if cfg.logging.tensorboard:
            check_tensorboard()
        check_model_name(cfg.model.name)
        check_devices(cfg)
        if cfg.model.weights:
            check_weights(cfg.model.weights)
        check_optimizer_and_schedule(cfg)
        check_augment(cfg)
    except ConfigError as e:
        print(f"[trainctl] config_error: {e}", file=sys.stderr, flush=True)
        return ExitCode.CONFIG_ERROR
    print(f"[trainctl] config ok: {cfg.model.name} on {', '.join(p.device for p in cfg.profiles)}", flush=True)
    return ExitCode.OK


def check_tensorboard() -> None:
    """[logging] tensorboard = true: the package imports (refused at `start`, not found out in a running worker)."""
    from .tensorboard_log import missing_message, summary_writer_class
    try:
        summary_writer_class()
    except ImportError as e:
        raise ConfigError(missing_message(e)) from None


def check_model_name(name: str) -> None:
    """A timm architecture, and, for 'arch.tag', one of its pretrained tags."""
    import difflib

    import timm
    import timm.models

    arch, _, tag = name.partition(".")
    if not timm.is_model(name):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"[model] name = {name!r} is not a timm model.{hint} "
                          f"Fix: use a name that timm.list_models() lists.")
    if tag:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = timm.list_pretrained(f"{arch}.*")
            raise ConfigError(f"[model] name = {name!r}: timm has no pretrained tag {tag!r} for {arch!r}. "
                              f"Fix: use one of {', '.join(tags[:8]) or arch}.") from None


def check_devices(cfg) -> None:
    """Every rung's device exists on this machine (the worker would find out only when it reaches that rung)."""
    from .device import resolve
    from .dist import check_group
    for i, profile in enumerate(cfg.profiles):
        try:
            check_group(profile, resolve(profile))
        except ConfigError as e:
            raise ConfigError(f"[[profiles]] #{i + 1} (rung {i + 1}): {e}") from None


def check_weights(path: str) -> None:
    """The [model] weights file reads as a state dict (its tensors are not loaded)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        else:
            import torch
            state = torch.load(path, map_location="meta", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
            keys = list(state) if isinstance(state, dict) else []
    except Exception as e:   # noqa: BLE001 — whatever the reader says, the file is not usable
        why = (str(e).strip().splitlines() or [""])[0]
        why = why if len(why) <= 160 else why[:157] + "..."
        raise ConfigError(f"[model] weights = {path!r} cannot be read ({type(e).__name__}: {why}). "
                          f"Fix: give a .safetensors or .pth state dict.") from None
    if not keys:
        raise ConfigError(f"[model] weights = {path!r} holds no weights. Fix: give a .safetensors or .pth state dict.")


def check_augment(cfg) -> None:
    """[augment] as timm's own transforms factory reads it (the config's grammar check is the standard library's)."""
    from .augment import build, is_on
    from .images import Recipe
    if is_on(cfg.augment):
        build(cfg.augment, Recipe(size=cfg.model.img_size or 224))


def check_optimizer_and_schedule(cfg) -> None:
    """[train] opt and sched are names timm's factories know (tried on a one-layer model)."""
    import torch

    from .model import build_optimizer, build_scheduler
    optimizer = build_optimizer(cfg, torch.nn.Linear(2, 2))
    build_scheduler(cfg, optimizer, total_steps=100, warmup_steps=int(100 * cfg.train.warmup_epochs / cfg.train.epochs))
