"""The run configuration: TOML → frozen dataclasses, validated with errors that name the key and the fix.

Standard library only: the CLI and the supervisor load configs without importing torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import platform
import shutil
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import tomlout
from .config_rules import (DEVICES, PRECISIONS, ConfigError, parse_duration, parse_growth,  # noqa: F401 (re-exported)
                           parse_memory_limit, validate)

FROZEN_HEADER = "# Frozen copy written by trainctl"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class RunSection:
    name: str
    runs_dir: Path = Path("runs")
    seed: int = 42


@dataclass(frozen=True)
class ModelSection:
    name: str
    pretrained: bool = False
    weights: str = ""                 # local .safetensors / .pth to start from ("" = none)
    img_size: int | None = None       # None = the model's own input size
    drop_path_rate: float = 0.0       # stochastic depth (timm.create_model's drop_path_rate); 0 = off
    drop_rate: float = 0.0            # dropout before the classifier (timm.create_model's drop_rate); 0 = off


@dataclass(frozen=True)
class DataSection:
    train_dir: Path
    val_dir: Path | None = None
    val_split: float = 0.0                           # no val_dir: this share of train_dir, per class, validates (split.py)
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    crop_scale: tuple[float, float] = (0.08, 1.0)     # random-resized-crop area range
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)   # random-resized-crop aspect range
    hflip: float = 0.5
    max_image_pixels: int = 89_478_485               # Pillow's decompression-bomb limit
    max_bad_share_step: float = 0.5                  # unreadable images in one optimizer step beyond this: data_error
    max_bad_share_epoch: float = 0.05                # ... in an epoch so far (from 1000 images on): data_error


@dataclass(frozen=True)
class TrainSection:
    epochs: int
    effective_batch_size: int
    lr: float
    opt: str = "adamw"                # any timm optimizer name
    weight_decay: float = 0.05
    sched: str = "cosine"             # any timm scheduler name
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0            # max grad norm; 0 = off
    log_every_steps: int = 10
    threads: int = 0                  # torch CPU threads; 0 = torch's default
    deterministic: bool = True
    max_nonfinite_steps: int = 3      # steps in a row with a non-finite loss (each skipped) before: diverged
    layer_decay: float | None = None  # layer-wise LR decay (timm's create_optimizer_v2 layer_decay); unset = off


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 0              # optimizer steps; 0 = off
    every_seconds: float = 600.0      # wall clock; 0 = off
    keep_last: int = 3
    async_write: bool = True          # snapshot to memory, write in the background
    at_failure: bool = True           # a caught failure (exception, OOM error) first writes its last completed step


@dataclass(frozen=True)
class Profile:
    batch_size: int
    device: str = "auto"
    num_workers: int = 0
    precision: str = "fp32"
    memory_fraction: float = 0.0      # CUDA/MPS per-process memory cap; 0 = backend default
    empty_cache_every: int = 100      # MPS: torch.mps.empty_cache() every N micro-batches
    nproc_per_node: int = 1           # data-parallel processes (torchrun's name); > 1: a DDP group (worker/dist.py)


@dataclass(frozen=True)
class SupervisorSection:
    max_restarts_per_profile: int = 3
    backoff_seconds: tuple[float, ...] = (1.0, 10.0, 60.0)
    hang_timeout_seconds: float | str = "auto"      # "auto": learned from the run's own steps (supervisor/watch.py)
    startup_timeout_seconds: float | str = "auto"   # "auto": learned from the run's earlier boots
    stop_timeout_seconds: float = 120.0
    memory_soft_limit: str = "85%"    # of total RAM, or a size like "12GB"; "" = off
    memory_hard_limit: str = "95%"
    same_step_limit: int = 2          # crashes at one step before that step is called poisonous
    poll_seconds: float = 1.0
    keep_awake: bool = True           # hold a sleep inhibitor (caffeinate / systemd-inhibit) while running
    warm_standby: bool = False        # keep a worker with torch imported ready to take over (uses memory)
    on_finish: str = ""               # shell command run when the run succeeds
    on_failure: str = ""              # shell command run when the run fails
    log_max_mb: float = 20.0          # rotate logs/*.log past this size (3 old files kept)
    # The operating system's memory pressure (supervisor/pressure.py): warning -> a checkpoint and empty_cache();
    # critical, or warning for memory_pressure_sustained_seconds -> checkpoint, stop, next rung.
    memory_pressure: bool = True
    memory_pressure_warning: float = 10.0     # Linux PSI "some avg10", percent of time stalled on memory
    memory_pressure_critical: float = 20.0    # Linux PSI "full avg10", percent
    memory_pressure_sustained_seconds: float = 120.0   # 0 = a warning never escalates
    recycle_growth: str = ""          # restart a worker whose memory grew this much since its first steps: "4GB", "50%"
    step_up_after: float | str = ""   # after this long stable on a lower rung, try the rung above once: "2h", 7200
    learn_rungs: bool = True          # start below a rung that ran out of memory 3 times lately (supervisor/rung_memory.py)


@dataclass(frozen=True)
class LoggingSection:
    tensorboard: bool = False         # event files in <run>/tensorboard/ (needs: pip install "trainctl[tensorboard]")


@dataclass(frozen=True)
class EmaSection:
    """An exponential moving average of the weights (timm's ModelEmaV3), updated once per optimizer step."""
    enabled: bool = False
    decay: float = 0.9998             # timm train.py's --model-ema-decay default
    warmup: bool = False              # ModelEmaV3 use_warmup: the decay grows with the optimizer step
    device: str = "same"              # "same": beside the model; "cpu": in CPU memory (keeps the GPU's for training)


@dataclass(frozen=True)
class AugmentSection:
    """timm's training augmentations, on the training images only (worker/augment.py); every default is off."""
    auto_augment: str = ""            # timm's grammar: "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original"...; "" = off
    color_jitter: float = 0.0         # brightness/contrast/saturation factor; as in timm, not applied with auto_augment
    re_prob: float = 0.0              # random erasing: the share of images erased; 0 = off
    re_mode: str = "pixel"            # erased with per-pixel noise ("pixel"), one random colour ("rand") or 0 ("const")
    re_count: int = 1                 # at most this many erased patches per image
    # Mixup / CutMix over the effective batch (worker/mixup.py): timm's --mixup, --cutmix, --cutmix-minmax,
    # --mixup-prob, --mixup-switch-prob, --mixup-mode; off while both alphas are 0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None   # CutMix box sides as shares of the image; set: alpha unused
    mixup_prob: float = 1.0           # the share of steps (batch mode), pairs or images that are mixed
    mixup_switch_prob: float = 0.5    # with both on: the chance of CutMix rather than Mixup
    mixup_mode: str = "batch"         # one draw per effective batch ("batch"), per pair ("pair"), per image ("elem")


@dataclass(frozen=True)
class Config:
    run: RunSection
    model: ModelSection
    data: DataSection
    train: TrainSection
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    supervisor: SupervisorSection = field(default_factory=SupervisorSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    ema: EmaSection = field(default_factory=EmaSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    profiles: tuple[Profile, ...] = ()
    source: Path | None = None        # the file it was loaded from (not a TOML key)

    @property
    def run_dir(self) -> Path:
        return self.run.runs_dir / self.run.name

    def grad_accum(self, rung_index: int) -> int:
        """Micro-batches per optimizer step (in each process) on a rung: the effective batch, batch_size x
        nproc_per_node x this, is the same on every rung."""
        p = self.profiles[rung_index]
        return self.train.effective_batch_size // (p.batch_size * p.nproc_per_node)

    def rung_text(self, rung_index: int) -> str:
        """'cpu batch 4 x accum 4' (a group: 'cuda x4 batch 16 x accum 1'): how a rung is shown to people."""
        p = self.profiles[rung_index]
        group = f" x{p.nproc_per_node}" if p.nproc_per_node > 1 else ""
        return f"{p.device}{group} batch {p.batch_size} x accum {self.grad_accum(rung_index)}"


SECTIONS = {"run": RunSection, "model": ModelSection, "data": DataSection, "train": TrainSection,
            "checkpoint": CheckpointSection, "supervisor": SupervisorSection, "logging": LoggingSection,
            "ema": EmaSection, "augment": AugmentSection}


def load(path: str | os.PathLike) -> Config:
    """Load and validate a config file; relative paths resolve against the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist. Fix: pass the path of your "
                          f"TOML config (see README, 'Config reference').") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}). Fix the syntax at that line.") from None
    return from_dict(raw, base_dir=path.resolve().parent, source=path.resolve())


def from_dict(raw: dict, base_dir: Path, source: Path | None = None) -> Config:
    """Build and validate a Config from parsed TOML."""
    where = source.name if source else "config"
    _reject_unknown(raw, list(SECTIONS) + ["profiles"], where, "")
    for required in ("run", "model", "data", "train"):
        if required not in raw:
            raise ConfigError(f"{where}: missing section [{required}]. Fix: add it (see README).")
    parts = {name: _build(cls, raw.get(name, {}), f"[{name}]", where) for name, cls in SECTIONS.items()}
    profiles_raw = raw.get("profiles", [])
    if not isinstance(profiles_raw, list) or not all(isinstance(p, dict) for p in profiles_raw):
        raise ConfigError(f"{where}: 'profiles' must be an array of tables ([[profiles]] blocks).")
    profiles = tuple(_build(Profile, p, f"[[profiles]] #{i + 1}", where)
                     for i, p in enumerate(profiles_raw))
    parts["run"] = dataclasses.replace(parts["run"], runs_dir=_absolute(parts["run"].runs_dir, base_dir))
    data = parts["data"]
    parts["data"] = dataclasses.replace(
        data, train_dir=_absolute(data.train_dir, base_dir),
        val_dir=_absolute(data.val_dir, base_dir) if data.val_dir else None,
        extensions=tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in data.extensions))
    model = parts["model"]
    if model.weights:
        parts["model"] = dataclasses.replace(model, weights=str(_absolute(Path(model.weights), base_dir)))
    if not profiles:
        accelerator = detect_accelerator()
        profiles = default_ladder(accelerator, parts["train"].effective_batch_size,
                                  gpu_count() if accelerator == "cuda" else 1)
    config = Config(profiles=profiles, source=source, **parts)
    validate(config, where)
    return config


def _absolute(path: Path, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (base_dir / path).resolve()


def _reject_unknown(table: dict, allowed: list[str], where: str, section: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Allowed: {', '.join(allowed)}."
            raise ConfigError(f"{where}: unknown key {section}{'.' if section else ''}{key}.{hint}")


def _build(cls, table, section: str, where: str):
    """Instantiate dataclass `cls` from a TOML table, checking names and types."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {section} must be a table, not {type(table).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(table, list(fields), where, section)
    values = {}
    for name, f in fields.items():
        if name in table:
            values[name] = _coerce(table[name], hints[name], f"{section}.{name}", where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {section}.{name}.")
    return cls(**values)


def _coerce(value, hint, key: str, where: str):
    """Check `value` against type `hint`; return it in the dataclass's type."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if str in inner and isinstance(value, str):   # "auto" or a number: the rules say which strings
            return _coerce(value, str, key, where)
        return _coerce(value, inner[0], key, where)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: {key} must be a list of {len(args)} values, got {value!r}.")
        return tuple(_coerce(v, a, key, where) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be a whole number, got {value!r}. Fix: write one like 3 "
                              f"(no quotes, no decimal point).")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}. Fix: write one like 0.5 (no quotes).")
        try:
            return float(value)
        except OverflowError:   # a whole number of 400 digits: no float holds it
            raise ConfigError(f"{where}: {key} is too large ({len(str(value))} digits). Fix: use a sensible "
                              f"value (see README, 'Config reference').") from None
    if hint in (str, Path):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}.")
        if "\0" in value:   # no path, name or command can hold one: the OS refuses it with a ValueError
            raise ConfigError(f"{where}: {key} = {value!r} contains a NUL character (\\u0000). Fix: remove it.")
        return Path(value) if hint is Path else value
    raise TypeError(f"unsupported config type {hint} for {key}")


def detect_accelerator() -> str | None:
    """'mps' on Apple silicon, 'cuda' where an NVIDIA driver is present, else None (no torch import)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps"
    if os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi"):
        return "cuda"
    return None


def gpu_count() -> int:
    """NVIDIA GPUs this process may use, without importing torch: the driver's list (/proc/driver/nvidia/gpus),
    cut to CUDA_VISIBLE_DEVICES when that is set; 1 when the driver does not list them (nvidia-smi only)."""
    try:
        found = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        found = min(found, len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]))
    return max(found, 1)


def default_ladder(accelerator: str | None, effective_batch_size: int, gpus: int = 1) -> tuple[Profile, ...]:
    """The ladder used when the config lists no [[profiles]]: MPS 2 → 1 → CPU; CUDA halving → CPU; CPU. With
    `gpus` > 1 it starts with a group on all of them, then half as many, ..., down to the one-GPU ladder."""
    def fits(b: int, k: int = 1) -> int:   # the largest batch d <= b with d x k dividing the effective batch
        return next((d for d in range(min(b, effective_batch_size), 0, -1) if effective_batch_size % (d * k) == 0), 1)
    if accelerator == "mps":
        sizes = [("mps", fits(2), 1), ("mps", 1, 1), ("cpu", 1, 1)]
    elif accelerator == "cuda":
        top = fits(32)
        groups = [k for k in (gpus >> i for i in range(gpus.bit_length())) if k > 1 and effective_batch_size % k == 0]
        sizes = ([("cuda", fits(32, k), k) for k in groups]
                 + [("cuda", top, 1), ("cuda", fits(top // 2 or 1), 1), ("cuda", fits(top // 4 or 1), 1), ("cpu", fits(4), 1)])
    else:
        sizes = [("cpu", fits(8), 1)]
    ladder: list[Profile] = []
    for device, batch, k in sizes:
        rung = Profile(device=device, batch_size=batch, nproc_per_node=k)
        if rung not in ladder:
            ladder.append(rung)
    return tuple(ladder)


def to_toml(c: Config) -> str:
    """Every effective value, absolute paths: the run directory's frozen copy."""
    doc: dict = {name: _plain(getattr(c, name)) for name in SECTIONS}
    doc["profiles"] = [_plain(p) for p in c.profiles]
    return FROZEN_HEADER + ": every effective value, paths made absolute.\n" + tomlout.dumps(doc)


def _plain(section) -> dict:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if value is None:
            continue  # TOML has no null: an absent key means the default (None)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def mixing_on(a: AugmentSection) -> bool:
    """Whether [augment] asks for Mixup or CutMix (as timm: either alpha above 0, or a CutMix box range)."""
    return a.mixup_alpha > 0 or a.cutmix_alpha > 0 or a.cutmix_minmax is not None
