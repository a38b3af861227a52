"""Drop path and dropout masks per sample, the same on every rung ([model] drop_path_rate, drop_rate; issue 18).

timm draws them from torch's global generator per call: a micro-batch of 4 and four micro-batches of 1 draw
different masks for the same images, so a rung change (batch 4 x 4 -> 1 x 16, or K processes -> 1) would train
another model, not the same one in another summation order. Here each mask value is a pure function of
(seed, step, the call's place in the forward pass, the sample's position in the effective batch, the element):
a counter-based hash (SplitMix64) over those numbers, computed with NumPy on the CPU and moved to the device.

`install` points timm's `drop_path` and torch's `F.dropout` at functions that draw this way while a training
micro-batch is inside `drawing(...)`, and at the originals otherwise (validation, the sanity check, other code).
It is installed only for a run that has drop path or dropout on, so every other run computes what it always did.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 counters (wrapping arithmetic): well-spread 64-bit values."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(key: int, positions: np.ndarray, per_sample: int) -> np.ndarray:
    """(len(positions), per_sample) floats in [0, 1): value j of the sample at `position` depends only on
    (key, position, j), never on which other samples share its micro-batch."""
    counters = positions.astype(np.uint64)[:, None] * np.uint64(per_sample) + np.arange(per_sample, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix(counters * _GOLDEN + np.uint64(key))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


class SampleMasks:
    """The state `drop_path` and `dropout` read while a training micro-batch runs forward."""

    def __init__(self):
        self.key: int | None = None       # None: not inside `drawing` — the originals run
        self.positions: np.ndarray | None = None
        self.calls = 0                    # masks drawn so far in this forward pass: names the call site

    @contextlib.contextmanager
    def drawing(self, seed: int, step: int, first_position: int, count: int):
        """Masks for a micro-batch whose samples sit at first_position .. + count - 1 of optimizer step `step`."""
        self.key = int(np.random.SeedSequence([seed, step, 0xD409]).generate_state(1, np.uint64)[0])
        self.positions, self.calls = np.arange(first_position, first_position + count), 0
        try:
            yield
        finally:
            self.key, self.positions = None, None

    def keep(self, x: torch.Tensor, keep_prob: float, per_sample: int) -> torch.Tensor:
        """A (batch, per_sample) 0/1 mask in x's dtype on x's device, for the next call site of the pass."""
        call_key = int(_splitmix(np.array([(self.key + self.calls) % 2 ** 64], dtype=np.uint64))[0])
        self.calls += 1
        u = uniforms(call_key, self.positions, per_sample)
        return torch.from_numpy(u < keep_prob).to(device=x.device, dtype=x.dtype, non_blocking=True)


MASKS = SampleMasks()   # one per process: the trainer's step sets it, the patched functions read it
_original: dict = {}


def install() -> None:
    """Point timm's drop_path and torch's dropout at the per-sample versions (once per process)."""
    import timm.layers.drop as timm_drop
    if _original:
        return
    _original.update(drop_path=timm_drop.drop_path, dropout=F.dropout)
    timm_drop.drop_path = drop_path
    F.dropout = dropout


def _drawing(x, training: bool, p: float) -> bool:
    """Inside a training micro-batch, on a batch-first tensor of it (anything else: the original function, drawing
    from the global generator that the step re-seeds — exact on resume, not across rungs)."""
    return (MASKS.key is not None and training and p != 0. and x.ndim > 0
            and x.shape[0] == len(MASKS.positions))


def drop_path(x, drop_prob: float = 0., training: bool = False, scale_by_keep: bool = True):
    """timm's drop_path (stochastic depth: one keep/drop per sample), its mask from MASKS inside a training step."""
    if not _drawing(x, training, drop_prob):
        return _original["drop_path"](x, drop_prob, training, scale_by_keep)
    keep_prob = 1 - drop_prob
    mask = MASKS.keep(x, keep_prob, 1).view((x.shape[0],) + (1,) * (x.ndim - 1))
    if keep_prob > 0.0 and scale_by_keep:
        mask = mask / keep_prob
    return x * mask


def dropout(input, p: float = 0.5, training: bool = True, inplace: bool = False):
    """torch's F.dropout (each element kept with 1 - p, scaled by 1 / (1 - p)), its mask from MASKS inside a
    training step."""
    if not _drawing(input, training, p):
        return _original["dropout"](input, p, training, inplace)
    keep_prob = 1 - p
    per_sample = input[0].numel()
    mask = MASKS.keep(input, keep_prob, per_sample).view(input.shape)
    scaled = mask / keep_prob if keep_prob > 0 else mask
    return input.mul_(scaled) if inplace else input * scaled
