"""The device layer: everything CPU/CUDA/MPS-specific lives here, and only here.

MPS survival rules applied automatically: num_workers forced to 0, ``torch.mps.empty_cache()``
every N micro-batches, ``PYTORCH_ENABLE_MPS_FALLBACK=1`` (`protocol.WORKER_ENV`, set before torch loads),
an optional per-process memory fraction so an over-allocation fails fast as a catchable error
instead of sliding into swap, and the allocator figures reported with every heartbeat (the MPS
cache grows without showing in RSS).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from trainctl.contract.config import ConfigError, Profile

# The texts of out-of-memory errors: CUDA, MPS ("MPS backend out of memory (MPS allocated: ..."),
# the CPU allocator. Matched without requiring a full stop or the word "CUDA" (others miss MPS).
OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate memory")


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve(profile: Profile) -> torch.device:
    """The torch device of a rung; 'auto' picks MPS, then CUDA, then CPU."""
    name = profile.device
    if name == "auto":
        name = "mps" if mps_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("this rung asks for device 'cuda' but torch sees no CUDA GPU. "
                          "Fix: use device = \"cpu\" or \"auto\" for this [[profiles]] entry.")
    if name == "mps" and not mps_available():
        raise ConfigError("this rung asks for device 'mps' but this torch build or machine has no MPS. "
                          "Fix: use device = \"cpu\" or \"auto\" for this [[profiles]] entry.")
    return torch.device(name)


def loader_workers(profile: Profile, device: torch.device) -> int:
    """DataLoader processes for a rung: always 0 on MPS (workers there crash and leak)."""
    if device.type == "mps" and profile.num_workers:
        warnings.warn(f"num_workers = {profile.num_workers} ignored on MPS: using 0 (MPS + loader "
                      f"processes is a known crash source)", stacklevel=2)
        return 0
    return profile.num_workers


def prepare(profile: Profile, device: torch.device) -> None:
    """Per-process device settings, applied once before the model moves to the device."""
    if device.type == "mps":
        if profile.memory_fraction:
            torch.mps.set_per_process_memory_fraction(profile.memory_fraction)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = False   # benchmark picks kernels by timing: not reproducible
        if profile.memory_fraction:
            torch.cuda.set_per_process_memory_fraction(min(profile.memory_fraction, 1.0))


def autocast(profile: Profile, device: torch.device):
    """The mixed-precision context for a rung (fp32 = none)."""
    if profile.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if profile.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(profile: Profile, device: torch.device):
    """A GradScaler for fp16 (None otherwise: bf16 and fp32 need none)."""
    if profile.precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def after_micro_batch(profile: Profile, device: torch.device, count: int) -> None:
    """Periodic allocator hygiene: MPS keeps freed blocks cached until asked to let go."""
    if device.type == "mps" and profile.empty_cache_every and count % profile.empty_cache_every == 0:
        torch.mps.empty_cache()


def empty_cache(device: torch.device) -> None:
    """Hand the allocator's cached blocks back (before a checkpoint at failure: its write must have room; on a
    requested one: the supervisor asks for it under memory pressure)."""
    if device.type == "mps":
        torch.mps.empty_cache()
    elif device.type == "cuda":
        torch.cuda.empty_cache()


def memory_stats(device: torch.device) -> dict:
    """Allocator figures RSS does not show (bytes)."""
    if device.type == "mps":
        return {"mps_driver_allocated": int(torch.mps.driver_allocated_memory()),
                "mps_current_allocated": int(torch.mps.current_allocated_memory())}
    if device.type == "cuda":
        return {"cuda_allocated": int(torch.cuda.memory_allocated(device)),
                "cuda_reserved": int(torch.cuda.memory_reserved(device))}
    return {}


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error from any backend."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS)


def rng_states(device: torch.device) -> dict:
    """The accelerator's RNG state, if any (CPU state is saved separately)."""
    if device.type == "cuda":
        return {"cuda": torch.cuda.get_rng_state_all()}
    if device.type == "mps":
        return {"mps": torch.mps.get_rng_state()}
    return {}


def set_rng_states(device: torch.device, states: dict) -> None:
    """Restore what `rng_states` saved, when resuming on the same kind of device."""
    if device.type == "cuda" and "cuda" in states and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    elif device.type == "mps" and "mps" in states:
        torch.mps.set_rng_state(states["mps"])
