"""Mixup and CutMix over the effective batch, the same on every rung and at micro-batch 1.

timm's `Mixup` mixes a batch with its own reverse: at batch size 1 (the Mac's stable rung) each image is mixed
with itself, and at any size the pairs depend on how the effective batch is cut into micro-batches. Here the
batch that is mixed is the effective batch (one optimizer step): position i of step s is mixed with position
E-1-i (timm's pairing, over E), and λ, the Mixup-or-CutMix switch and the CutMix box are drawn by timm's own
`Mixup` parameter code and `cutmix_bbox_and_lam` from numpy's global generator, seeded from (seed, epoch, step)
for that call only and then put back. A micro-batch that does not hold its samples' partners gets their images
from the loader (`data.MicroBatches`, decoded like any sample: the same pixels). So batch 8 x 8, 2 x 32 and 1 x 64
mix the same pairs with the same λ and boxes, and each sample's input and soft target are the same on every rung.

A sample whose partner is unreadable is not mixed (λ = 1): the dummy image must not leak into a real one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, one_hot

MIX_TAG = 0x4D495855   # "MIXU": keeps these draws apart from every other per-step seed of the run


@dataclass(frozen=True)
class Plan:
    """One optimizer step's mixing, per position in the effective batch: λ (after CutMix's area correction),
    whether CutMix, and CutMix's box (yl, yh, xl, xh; unused for Mixup)."""
    lam: np.ndarray        # float32 (E,)
    cutmix: np.ndarray     # bool (E,)
    boxes: np.ndarray      # int64 (E, 4)

    def partner(self, position: int) -> int:
        return len(self.lam) - 1 - position


class Mixing:
    """The run's Mixup/CutMix (`settings`: the [augment] section), for effective batch `E` of `size` x `size` images
    over `num_classes` classes with label smoothing `smoothing`."""

    def __init__(self, settings, seed: int, E: int, size: int, num_classes: int, smoothing: float):
        self.seed, self.E, self.shape = seed, E, (size, size)
        self.mode, self.minmax = settings.mixup_mode, settings.cutmix_minmax
        self.num_classes, self.smoothing = num_classes, smoothing
        self.timm = Mixup(mixup_alpha=settings.mixup_alpha, cutmix_alpha=settings.cutmix_alpha,
                          cutmix_minmax=settings.cutmix_minmax, prob=settings.mixup_prob,
                          switch_prob=settings.mixup_switch_prob, mode=settings.mixup_mode,
                          label_smoothing=smoothing, num_classes=num_classes)
        self._cached: tuple[tuple[int, int], Plan] | None = None

    def plan(self, epoch: int, step: int) -> Plan:
        """The plan of step `step` of epoch `epoch` (a pure function of the seed, epoch and step)."""
        if self._cached is None or self._cached[0] != (epoch, step):
            self._cached = (epoch, step), self._draw(epoch, step)
        return self._cached[1]

    def _draw(self, epoch: int, step: int) -> Plan:
        E = self.E
        seed = np.random.SeedSequence([self.seed, epoch, step, MIX_TAG]).generate_state(1)[0]
        saved = np.random.get_state()
        np.random.seed(seed)
        try:
            if self.mode == "batch":
                lam, cut = self.timm._params_per_batch()
                lam, cut = np.full(E, lam, np.float32), np.full(E, cut)
                one = [0] if cut[0] and lam[0] != 1.0 else []
            else:   # elem: each position its own draw; pair: positions i and E-1-i share one
                n = E if self.mode == "elem" else E // 2
                lam, cut = self.timm._params_per_elem(n)
                one = [i for i in range(n) if cut[i] and lam[i] != 1.0]
                if self.mode == "pair":
                    lam, cut = np.concatenate([lam, lam[::-1]]), np.concatenate([cut, cut[::-1]])
            lam, boxes = lam.astype(np.float32), np.zeros((E, 4), np.int64)
            for i in one:   # in timm's order: the boxes come after the λ draws
                box, lam_i = cutmix_bbox_and_lam(self.shape, lam[i], ratio_minmax=self.minmax, correct_lam=True)
                mirrored = (E - 1 - i,) if self.mode == "pair" else ()
                for k in (range(E) if self.mode == "batch" else (i, *mirrored)):
                    boxes[k], lam[k] = [int(v) for v in box], lam_i
            return Plan(lam, cut & (lam != 1.0), boxes)
        finally:
            np.random.set_state(saved)

    def mix(self, plan: Plan, positions: list[int], x: torch.Tensor, partner_x: torch.Tensor,
            partner_ok: torch.Tensor) -> torch.Tensor:
        """The micro-batch's inputs (`x`, normalised, positions `positions` of the step) mixed with their partners';
        returns the per-sample λ actually used (1 where the partner is unreadable). `x` is changed in place."""
        lam = torch.tensor(plan.lam[positions], dtype=x.dtype).to(x.device)
        lam = torch.where(partner_ok.to(x.device), lam, torch.ones_like(lam))
        for k, p in enumerate(positions):
            if lam[k] == 1.0:
                continue
            if plan.cutmix[p]:
                yl, yh, xl, xh = plan.boxes[p]
                x[k, :, yl:yh, xl:xh] = partner_x[k, :, yl:yh, xl:xh]
            else:
                x[k] = x[k] * lam[k] + partner_x[k] * (1 - lam[k])
        return lam

    def targets(self, labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Soft targets as timm's `mixup_target` makes them (label smoothing included), from explicit partners."""
        off = self.smoothing / self.num_classes
        on = 1.0 - self.smoothing + off
        own = one_hot(labels, self.num_classes, on, off)
        other = one_hot(partner_labels, self.num_classes, on, off)
        lam = lam.to(own.dtype).unsqueeze(1)
        return own * lam + other * (1 - lam)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against soft targets (timm's SoftTargetCrossEntropy, before its batch mean)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
