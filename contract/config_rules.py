"""The rules a config must follow beyond its types: ranges, consistency, sizes. Standard library only."""
from __future__ import annotations

import os
from pathlib import Path

DEVICES = ("cpu", "cuda", "mps", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration problem, with the key and what to do about it in the message."""


def _fail(where: str, key: str, value, why: str, fix: str) -> None:
    raise ConfigError(f"{where}: {key} = {value!r} {why}. Fix: {fix}.")


def validate(c, where: str = "config") -> None:
    """Range and consistency checks that types alone cannot express."""
    if not c.run.name or "/" in c.run.name or c.run.name in (".", ".."):
        _fail(where, "[run] name", c.run.name, "is not a usable folder name", "use letters, digits, '-' or '_'")
    if not c.model.name.strip():
        _fail(where, "[model] name", c.model.name, "is empty", "give a timm model name, e.g. 'vit_tiny_patch16_224'")
    if c.model.img_size is not None and not 8 <= c.model.img_size <= 4096:
        _fail(where, "[model] img_size", c.model.img_size, "is out of range", "use a size between 8 and 4096")
    if c.model.weights and not Path(c.model.weights).is_file():
        _fail(where, "[model] weights", c.model.weights, "is not a file",
              "give the path of a local .safetensors or .pth file, or \"\"")
    d = c.data
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        _fail(where, "[data] crop_scale", list(d.crop_scale), "is not a range within (0, 1]", "use e.g. [0.08, 1.0]")
    if not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        _fail(where, "[data] crop_ratio", list(d.crop_ratio), "is not an increasing positive range", "use e.g. [0.75, 1.3333]")
    if not 0 <= d.hflip <= 1:
        _fail(where, "[data] hflip", d.hflip, "is not a probability", "use a value between 0 and 1")
    if d.max_image_pixels < 1:
        _fail(where, "[data] max_image_pixels", d.max_image_pixels, "must be positive", "use Pillow's default 89478485 or larger")
    if not d.extensions:
        _fail(where, "[data] extensions", [], "is empty", "list the image extensions to read, e.g. ['.jpg', '.png']")
    t = c.train
    for key, value, low in (("epochs", t.epochs, 1), ("effective_batch_size", t.effective_batch_size, 1),
                            ("log_every_steps", t.log_every_steps, 1), ("threads", t.threads, 0)):
        if value < low:
            _fail(where, f"[train] {key}", value, f"must be at least {low}", f"set it to {low} or more")
    for key, value in (("lr", t.lr), ("weight_decay", t.weight_decay), ("warmup_epochs", t.warmup_epochs),
                       ("warmup_lr", t.warmup_lr), ("min_lr", t.min_lr), ("grad_clip", t.grad_clip)):
        if value < 0 or value != value:
            _fail(where, f"[train] {key}", value, "must be zero or positive", "use a non-negative number")
    if t.lr == 0:
        _fail(where, "[train] lr", t.lr, "is zero, so nothing would be learned", "use e.g. 5e-4")
    if t.warmup_epochs >= t.epochs:
        _fail(where, "[train] warmup_epochs", t.warmup_epochs, f"is not below epochs ({t.epochs})", "use a shorter warmup")
    if not 0 <= t.label_smoothing < 1:
        _fail(where, "[train] label_smoothing", t.label_smoothing, "is not in [0, 1)", "use e.g. 0.1")
    k = c.checkpoint
    if k.every_steps < 0 or k.every_seconds < 0:
        _fail(where, "[checkpoint] every_steps/every_seconds", (k.every_steps, k.every_seconds),
              "must not be negative", "use 0 to turn one off")
    if k.keep_last < 1:
        _fail(where, "[checkpoint] keep_last", k.keep_last, "must be at least 1",
              "keep 1 or more checkpoints (3 is a good default)")
    for i, p in enumerate(c.profiles):
        key = f"[[profiles]] #{i + 1}"
        if p.device not in DEVICES:
            _fail(where, f"{key} device", p.device, "is not a known device", f"use one of {', '.join(DEVICES)}")
        if p.precision not in PRECISIONS:
            _fail(where, f"{key} precision", p.precision, "is not known", f"use one of {', '.join(PRECISIONS)}")
        if p.batch_size < 1:
            _fail(where, f"{key} batch_size", p.batch_size, "must be at least 1", "use 1 or more")
        if t.effective_batch_size % p.batch_size:
            divisors = [b for b in range(1, t.effective_batch_size + 1) if t.effective_batch_size % b == 0]
            _fail(where, f"{key} batch_size", p.batch_size,
                  f"does not divide [train] effective_batch_size = {t.effective_batch_size}",
                  f"use a batch_size in {divisors}, or an effective_batch_size that is a multiple of {p.batch_size}")
        if p.num_workers < 0 or p.empty_cache_every < 0:
            _fail(where, f"{key} num_workers/empty_cache_every", (p.num_workers, p.empty_cache_every),
                  "must not be negative", "use 0 or more")
        if not 0 <= p.memory_fraction <= 2:
            _fail(where, f"{key} memory_fraction", p.memory_fraction, "is out of range", "use 0 (off) or a fraction like 0.8")
    s = c.supervisor
    if s.max_restarts_per_profile < 0 or s.same_step_limit < 1:
        _fail(where, "[supervisor] max_restarts_per_profile/same_step_limit",
              (s.max_restarts_per_profile, s.same_step_limit), "is out of range",
              "use max_restarts_per_profile >= 0 and same_step_limit >= 1")
    if not s.backoff_seconds or any(b < 0 for b in s.backoff_seconds):
        _fail(where, "[supervisor] backoff_seconds", list(s.backoff_seconds),
              "must be a non-empty list of non-negative seconds", "use e.g. [2, 10, 60]")
    for key in ("hang_timeout_seconds", "startup_timeout_seconds", "stop_timeout_seconds", "poll_seconds",
                "log_max_mb"):
        if getattr(s, key) <= 0:
            _fail(where, f"[supervisor] {key}", getattr(s, key), "must be positive", "use a number of seconds above 0")
    total = machine_memory()
    for key in ("memory_soft_limit", "memory_hard_limit"):
        _check_memory_limit(where, f"[supervisor] {key}", getattr(s, key), total)


def _check_memory_limit(where: str, key: str, text: str, total: int | None) -> None:
    """A limit people can read one way only, and high enough for a worker to boot under it."""
    share = text.strip().endswith("%")
    try:
        limit = parse_memory_limit(text, total=total or 1 << 40)
    except ValueError as e:
        _fail(where, key, text, f"is not understood ({e})", "use a share like \"85%\", a size like \"12GB\", or \"\" for off")
    if limit is None or limit >= MIN_MEMORY_LIMIT or (share and not total):
        return
    of = f" ({limit / 2**30:.2f} GiB of this machine's {total / 2**30:.1f} GiB)" if share else ""
    _fail(where, key, text, f"is below the {MIN_MEMORY_LIMIT >> 30} GiB a worker needs to boot{of}, so every attempt "
          f"would be stopped before it trains", "use a share like \"85%\", a size of 1GB or more, or \"\" for off")


# A worker with torch and timm imported holds about 0.75 GiB before its first image (bench/RESULTS.md:
# 747 MiB for a warm standby); a memory limit below this would stop every attempt while it boots.
MIN_MEMORY_LIMIT = 1 << 30


def machine_memory() -> int | None:
    """This machine's RAM in bytes (standard library only), or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


_UNITS = {"b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_memory_limit(text: str, total: int) -> int | None:
    """'85%' of `total` bytes, or a size with its unit ('12GB', '512MiB', '1000000B'); '' = no limit (None).

    A bare number is refused: "85" is more likely a forgotten '%' than 85 bytes.
    """
    text = text.strip().lower()
    if not text:
        return None
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise ValueError(f"{text[:-1]!r} is not a number") from None
        if not 0 < share <= 100:
            raise ValueError("a share must be between 0% and 100%")
        return int(total * share / 100)
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = text[len(number):].strip()
    if not unit and number:
        raise ValueError(f"a bare number has no unit: write \"{number}%\" for a share of RAM or a size like "
                         f"\"{number}GB\"")
    if unit not in _UNITS or not number:
        raise ValueError("expected a share like 85% or a number with a unit (B, KB, MB, GB, TB)")
    try:
        value = int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"{number!r} is not a number") from None
    if value <= 0:
        raise ValueError("a size must be positive")
    return value
