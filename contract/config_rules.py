"""The rules a config must follow beyond its types: ranges, consistency, sizes. Standard library only."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

DEVICES = ("cpu", "cuda", "mps", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration problem, with the key and what to do about it in the message."""


def _fail(where: str, key: str, value, why: str, fix: str) -> None:
    raise ConfigError(f"{where}: {key} = {value!r} {why}. Fix: {fix}.")


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: low..high, either end excluded when `above` / `below`."""
    low: float
    high: float
    above: bool = False    # low itself is not allowed (e.g. a learning rate of 0)
    below: bool = False    # high itself is not allowed (e.g. label smoothing of 1)
    unit: str = ""         # 'seconds': said in the fix

    def allows(self, value) -> bool:
        low_ok = value > self.low if self.above else value >= self.low
        return low_ok and (value < self.high if self.below else value <= self.high)

    def text(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.above:
            return f"above {low} and {'below' if self.below else 'at most'} {high}"
        return f"at least {low} and below {high}" if self.below else f"between {low} and {high}"


SECONDS_MAX = 1_000_000     # about 11.5 days: longer than any timeout, backoff or interval that makes sense
COUNT_MAX = 1_000_000_000
RATE_MAX = 1e6              # a huge but finite rate diverges, which training reports; inf cannot even be scheduled

# Every numeric key of the config, (section, key) → what it allows; a list's items each obey the range.
# `check_numbers` applies it to every number before any other rule reads one: no nan, inf or overflow
# gets past `start`. A numeric key missing here is still refused when not finite (tests/test_hostile_values.py
# checks that every key has a range).
RANGES = {
    ("run", "seed"): Range(0, 2**32 - 1),   # numpy's SeedSequence refuses negatives; 32 bits is what every seeder takes
    ("model", "img_size"): Range(8, 4096),
    ("model", "drop_path_rate"): Range(0, 1, below=True),   # a probability; 1 would drop every residual branch
    ("model", "drop_rate"): Range(0, 1, below=True),
    ("data", "crop_scale"): Range(0, 1, above=True),
    ("data", "crop_ratio"): Range(0, 100, above=True),
    ("data", "hflip"): Range(0, 1),
    ("data", "val_split"): Range(0, 1, below=True),   # 1 would leave nothing to train on
    ("data", "max_image_pixels"): Range(1, 10**12),
    ("data", "max_bad_share_step"): Range(0, 1),
    ("data", "max_bad_share_epoch"): Range(0, 1),
    ("train", "epochs"): Range(1, 1_000_000),
    ("train", "effective_batch_size"): Range(1, 1_000_000),
    ("train", "lr"): Range(0, RATE_MAX, above=True),
    ("train", "weight_decay"): Range(0, RATE_MAX),
    ("train", "warmup_epochs"): Range(0, 1_000_000),
    ("train", "warmup_lr"): Range(0, RATE_MAX),
    ("train", "min_lr"): Range(0, RATE_MAX),
    ("train", "label_smoothing"): Range(0, 1, below=True),
    ("train", "grad_clip"): Range(0, RATE_MAX),
    ("train", "log_every_steps"): Range(1, COUNT_MAX),
    ("train", "threads"): Range(0, 4096),
    ("train", "max_nonfinite_steps"): Range(1, 1_000_000),
    ("train", "layer_decay"): Range(0, 1, above=True),   # the head's LR x layer_decay per layer down; 1 = every layer alike
    ("checkpoint", "every_steps"): Range(0, COUNT_MAX),
    ("checkpoint", "every_seconds"): Range(0, SECONDS_MAX, unit="seconds"),
    ("checkpoint", "keep_last"): Range(1, 1_000_000),
    ("profiles", "batch_size"): Range(1, 1_000_000),
    ("profiles", "nproc_per_node"): Range(1, 1024),
    ("profiles", "num_workers"): Range(0, 1024),
    ("profiles", "memory_fraction"): Range(0, 2),
    ("profiles", "empty_cache_every"): Range(0, COUNT_MAX),
    ("supervisor", "max_restarts_per_profile"): Range(0, 1_000_000),
    ("supervisor", "backoff_seconds"): Range(0, SECONDS_MAX, unit="seconds"),
    ("supervisor", "hang_timeout_seconds"): Range(1, SECONDS_MAX, unit="seconds"),
    ("supervisor", "startup_timeout_seconds"): Range(1, SECONDS_MAX, unit="seconds"),
    ("supervisor", "stop_timeout_seconds"): Range(1, SECONDS_MAX, unit="seconds"),
    ("supervisor", "same_step_limit"): Range(1, 1_000_000),
    ("supervisor", "poll_seconds"): Range(0.01, 60, unit="seconds"),   # a stop or a hang waits up to one poll
    ("supervisor", "log_max_mb"): Range(0.01, 1_000_000, unit="MB"),
    ("supervisor", "memory_pressure_warning"): Range(0, 100, above=True, unit="percent"),
    ("supervisor", "memory_pressure_critical"): Range(0, 100, above=True, unit="percent"),
    ("supervisor", "memory_pressure_sustained_seconds"): Range(0, SECONDS_MAX, unit="seconds"),
    ("supervisor", "step_up_after"): Range(1, SECONDS_MAX, unit="seconds"),
    ("ema", "decay"): Range(0, 1, above=True, below=True),   # 0 would copy the model at every step, 1 never move
    ("augment", "color_jitter"): Range(0, 1),   # each factor drawn from [1 - x, 1 + x]: 1 reaches black and double
    ("augment", "re_prob"): Range(0, 1),
    ("augment", "re_count"): Range(1, 100),
    ("augment", "mixup_alpha"): Range(0, 100),   # Beta(alpha, alpha): timm's recipes use 0.1 to 1
    ("augment", "cutmix_alpha"): Range(0, 100),
    ("augment", "cutmix_minmax"): Range(0, 1, above=True),   # shares of the image's sides
    ("augment", "mixup_prob"): Range(0, 1),
    ("augment", "mixup_switch_prob"): Range(0, 1),
}
EMA_DEVICES = ("same", "cpu")


def check_numbers(c, where: str = "config") -> None:
    """Every number of the config finite and in its range (RANGES), else one ConfigError naming the key."""
    for section, label, table in sections(c):
        for f in dataclasses.fields(table):
            value = getattr(table, f.name)
            items = value if isinstance(value, tuple) else (value,)
            if not items or not all(_is_number(v) for v in items):
                continue
            key = f"{label} {f.name}"
            shown = list(value) if isinstance(value, tuple) else value
            allowed = RANGES.get((section, f.name))
            kind = "whole number" if all(isinstance(v, int) for v in items) else "number"
            kind = f"only {kind}s" if isinstance(value, tuple) else f"a {kind}"
            kind += f" of {allowed.unit}" if allowed and allowed.unit else ""
            fix = f"use {kind} {allowed.text()}" if allowed else f"use {kind} that is finite"
            if not all(isinstance(v, int) or math.isfinite(v) for v in items):   # an int is finite (and may not fit a float)
                _fail(where, key, shown, "is not a finite number", fix)
            if allowed and not all(allowed.allows(v) for v in items):
                _fail(where, key, shown, "is out of range", fix)


def sections(c):
    """(section, label, table) for each table of a Config: ('train', '[train]', ...), ('profiles', '[[profiles]] #1', ...)."""
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if dataclasses.is_dataclass(value):
            yield f.name, f"[{f.name}]", value
        elif isinstance(value, tuple) and value and all(dataclasses.is_dataclass(v) for v in value):
            yield from ((f.name, f"[[{f.name}]] #{i + 1}", v) for i, v in enumerate(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value) -> str:
    """1000000, not 1e+06: how a bound reads in a message."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else repr(value)


def _some(values: list, most: int = 24) -> str:
    """'[1, 2, 5, 10]', or the first and last few of a long list."""
    if len(values) <= most:
        return str(values)
    return f"[{', '.join(map(str, values[:most // 2]))}, ..., {', '.join(map(str, values[-most // 2:]))}]"


def _check_group(where: str, key: str, p, effective: int) -> None:
    """A rung of K data-parallel processes: each takes batch_size images per micro-batch, so batch_size x K must
    divide the effective batch; MPS has no multi-process backend."""
    k = p.nproc_per_node
    if k == 1:
        return
    if p.device == "mps":
        _fail(where, f"{key} nproc_per_node", k, "is above 1 on device \"mps\" (MPS has no multi-process backend)",
              "use nproc_per_node = 1 on the Mac")
    if effective % (p.batch_size * k):
        _fail(where, f"{key} nproc_per_node", k,
              f"x batch_size {p.batch_size} = {p.batch_size * k} images per micro-batch does not divide [train] "
              f"effective_batch_size = {effective}",
              f"use a batch_size in {_some([d for d in divisors(effective) if (effective // d) % k == 0])} "
              f"with {k} processes, or an effective_batch_size that is a multiple of {p.batch_size * k}")


def divisors(n: int) -> list[int]:
    """The divisors of `n` in increasing order, by trial division up to its square root ([] for n < 1)."""
    if n < 1:
        return []
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def validate(c, where: str = "config") -> None:
    """Range and consistency checks that types alone cannot express."""
    if not c.run.name or "/" in c.run.name or c.run.name in (".", ".."):
        _fail(where, "[run] name", c.run.name, "is not a usable folder name", "use letters, digits, '-' or '_'")
    check_numbers(c, where)
    if not c.model.name.strip():
        _fail(where, "[model] name", c.model.name, "is empty", "give a timm model name, e.g. 'vit_tiny_patch16_224'")
    if c.model.weights and not Path(c.model.weights).is_file():
        _fail(where, "[model] weights", c.model.weights, "is not a file",
              "give the path of a local .safetensors or .pth file, or \"\"")
    d = c.data
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        _fail(where, "[data] crop_scale", list(d.crop_scale), "is not a range within (0, 1]", "use e.g. [0.08, 1.0]")
    if not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        _fail(where, "[data] crop_ratio", list(d.crop_ratio), "is not an increasing positive range", "use e.g. [0.75, 1.3333]")
    if not d.extensions:
        _fail(where, "[data] extensions", [], "is empty", "list the image extensions to read, e.g. ['.jpg', '.png']")
    if d.val_split and d.val_dir:   # two validation sets: which one would the accuracy be of?
        _fail(where, "[data] val_split", d.val_split, f"is set together with [data] val_dir ({d.val_dir})",
              "use one of them: remove val_dir to validate on the share of train_dir that val_split holds out, "
              "or remove val_split (or set it to 0) to validate on val_dir")
    t = c.train
    from .augment_rules import check_augment, check_mixing   # it uses _fail from here
    check_augment(c.augment, where)
    check_mixing(c.augment, t.effective_batch_size, where)
    if c.ema.device not in EMA_DEVICES:
        _fail(where, "[ema] device", c.ema.device, "is not known",
              '"same" keeps the EMA beside the model, "cpu" keeps it in CPU memory (the accelerator\'s stays for '
              'training): use one of those')
    if t.warmup_epochs >= t.epochs:
        _fail(where, "[train] warmup_epochs", t.warmup_epochs, f"is not below epochs ({t.epochs})", "use a shorter warmup")
    for i, p in enumerate(c.profiles):
        key = f"[[profiles]] #{i + 1}"
        if p.device not in DEVICES:
            _fail(where, f"{key} device", p.device, "is not a known device", f"use one of {', '.join(DEVICES)}")
        if p.precision not in PRECISIONS:
            _fail(where, f"{key} precision", p.precision, "is not known", f"use one of {', '.join(PRECISIONS)}")
        if t.effective_batch_size % p.batch_size:
            _fail(where, f"{key} batch_size", p.batch_size,
                  f"does not divide [train] effective_batch_size = {t.effective_batch_size}",
                  f"use a batch_size in {_some(divisors(t.effective_batch_size))}, or an effective_batch_size "
                  f"that is a multiple of {p.batch_size}")
        _check_group(where, key, p, t.effective_batch_size)
    s = c.supervisor
    if not s.backoff_seconds:
        _fail(where, "[supervisor] backoff_seconds", [], "must be a non-empty list of seconds", "use e.g. [2, 10, 60]")
    for key in ("hang_timeout_seconds", "startup_timeout_seconds"):   # a number was range-checked above
        if isinstance(getattr(s, key), str) and getattr(s, key) != "auto":
            _fail(where, f"[supervisor] {key}", getattr(s, key), 'is neither "auto" nor a number of seconds',
                  'write "auto" (learned from the run\'s own steps and boots) or a number of seconds like 300, '
                  'without quotes')
    total = machine_memory()
    for key in ("memory_soft_limit", "memory_hard_limit"):
        _check_memory_limit(where, f"[supervisor] {key}", getattr(s, key), total)
    try:
        parse_growth(s.recycle_growth)
    except ValueError as e:
        _fail(where, "[supervisor] recycle_growth", s.recycle_growth, f"is not understood ({e})",
              'use a size like "4GB", a share of the first steps\' footprint like "50%", or "" for off')
    try:
        parse_duration(s.step_up_after)
    except ValueError as e:
        _fail(where, "[supervisor] step_up_after", s.step_up_after, f"is not understood ({e})",
              'use a duration like "2h", "90m" or "600s", a number of seconds, or "" for off')


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
MAX_MEMORY_LIMIT = 1 << 60


def machine_memory() -> int | None:
    """This machine's RAM in bytes (standard library only), or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


_UNITS = {"b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_growth(text: str) -> tuple[int | None, float | None]:
    """`[supervisor] recycle_growth`: (bytes, None) for a size like '4GB', (None, share) for '50%' of the
    footprint of the worker's first steps (may exceed 100%), (None, None) for '' (off)."""
    stripped = text.strip()
    if stripped.endswith("%"):
        try:
            share = float(stripped[:-1])
        except ValueError:
            raise ValueError(f"{stripped[:-1]!r} is not a number") from None
        if not 0 < share <= 10_000 or not math.isfinite(share):
            raise ValueError("a share must be above 0% and at most 10000%")
        return None, share / 100
    if stripped.replace(".", "", 1).isdigit():
        raise ValueError(f"a bare number has no unit: write \"{stripped}GB\" or a share like \"{stripped}%\"")
    return parse_memory_limit(stripped, total=1), None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: float | str) -> float | None:
    """A duration in seconds from a number of seconds or '2h', '90m', '600s', '1d'; '' is off (None)."""
    if not isinstance(value, str):
        return float(value)   # range-checked with the other numbers
    text = value.strip().lower()
    if not text:
        return None
    number, unit = text[:-1], text[-1]
    if unit not in _DURATION_UNITS:
        raise ValueError("expected a number with a unit: s, m, h or d")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        raise ValueError(f"{number!r} is not a number") from None
    if not 1 <= seconds <= SECONDS_MAX:
        raise ValueError(f"a duration must be between 1 second and {SECONDS_MAX} seconds")
    return seconds


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
        size = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{number!r} is not a number") from None
    if not math.isfinite(size):   # '1e999GB' is inf: int() of it would raise OverflowError
        raise ValueError(f"{number!r} is not a finite number")
    if size > MAX_MEMORY_LIMIT:
        raise ValueError("that is more than any machine's memory (at most 1 EiB)")
    if size < 1:
        raise ValueError("a size must be positive")
    return int(size)
