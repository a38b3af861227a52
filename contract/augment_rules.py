"""[augment]'s rules: timm's auto_augment grammar, the random-erasing modes and Mixup/CutMix (config_rules.validate
calls `check_augment`). Standard library only, as all of contract/.
"""
from __future__ import annotations

import re

from .config_rules import _fail

RE_MODES = ("pixel", "rand", "const")
# timm's auto_augment grammar (timm.data.auto_augment): a policy, then '-'-separated sections, each a key and its value
# ('m9', 'mstd0.5'). Checked here without timm, so `trainctl start` refuses a typo, also where timm's parser would skip
# it without a word; the worker then builds the transform with timm's own parser (worker/augment.py: ConfigError too).
AUTO_AUGMENT_KEYS = {"rand": {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int},
                     "augmix": {"m": int, "w": int, "d": int, "a": float, "b": int, "mstd": float},
                     **{policy: {"mstd": float} for policy in ("original", "originalr", "v0", "v0r", "3a")}}
RAND_TRANSFORM_SETS = ("weights", "3aw", "3a")   # RandAugment's 't' section: timm.data.auto_augment.rand_augment_choices
AUTO_AUGMENT_FIX = ('use timm\'s grammar, e.g. "rand-m9-mstd0.5-inc1" (RandAugment), "augmix-m3-w3" (AugMix), '
                    '"original" or "v0" (AutoAugment policies), or "" for off')


def check_augment(a, where: str) -> None:
    """[augment]: a random-erasing mode timm knows, and an auto_augment string in timm's grammar."""
    if a.re_mode not in RE_MODES:
        _fail(where, "[augment] re_mode", a.re_mode, "is not a random-erasing mode",
              'use "pixel" (per-pixel noise, timm train.py\'s default), "rand" (one random colour per patch) or '
              '"const" (0 after normalisation: the mean colour)')
    if a.auto_augment and (problem := auto_augment_problem(a.auto_augment)):
        _fail(where, "[augment] auto_augment", a.auto_augment, problem, AUTO_AUGMENT_FIX)


def auto_augment_problem(text: str) -> str | None:
    """What in `text` timm's auto_augment parser would refuse, or ignore without a word; None if nothing."""
    policy, *sections = text.split("-")
    keys = AUTO_AUGMENT_KEYS.get(policy)
    if keys is None:
        return f"does not start with a policy timm knows ({', '.join(AUTO_AUGMENT_KEYS)})"
    for section in sections:
        if policy == "rand" and section.startswith("t"):   # a transform set ('tweights'); timm takes its default for others
            if section[1:] not in RAND_TRANSFORM_SETS:
                return f"names a transform set {section[1:]!r} timm does not have (it has {', '.join(RAND_TRANSFORM_SETS)})"
            continue
        key, value = re.match(r"(\D*)(.*)", section).groups()   # split at the first digit, as timm does
        if not value:   # timm skips a section without a digit: a typo would pass unnoticed
            return f"has a section {section!r} without a value (timm would ignore it)"
        if key not in keys:
            return f"has a section {section!r} that '{policy}' does not take (it takes {', '.join(keys)})"
        try:
            keys[key](value)
        except ValueError:
            kind = "whole number" if keys[key] is int else "number"
            return f"has a section {section!r} whose value {value!r} is not a {kind}"
    return None


MIXUP_MODES = ("batch", "pair", "elem")


def check_mixing(a, effective_batch_size: int, where: str) -> None:
    """Mixup/CutMix (the numbers' ranges are in config_rules.RANGES): a mode timm knows, an increasing CutMix box
    range, and an even effective batch (each position is paired with its mirror, E-1-i, as timm pairs a batch)."""
    if a.mixup_mode not in MIXUP_MODES:
        _fail(where, "[augment] mixup_mode", a.mixup_mode, "is not a mixing mode",
              'use "batch" (one draw per effective batch, timm\'s default), "pair" or "elem"')
    if a.cutmix_minmax is not None and not a.cutmix_minmax[0] < a.cutmix_minmax[1]:
        _fail(where, "[augment] cutmix_minmax", list(a.cutmix_minmax), "is not an increasing range",
              "use e.g. [0.2, 0.8], or leave it out")
    mixing = a.mixup_alpha > 0 or a.cutmix_alpha > 0 or a.cutmix_minmax is not None
    if mixing and effective_batch_size % 2:
        _fail(where, "[train] effective_batch_size", effective_batch_size, "is odd, and Mixup/CutMix pair each image "
              "of an effective batch with another", f"use an even effective_batch_size (e.g. {effective_batch_size + 1})")
