"""What a checkpoint holds and how it is put back: everything exact resume needs, device-independent."""
from __future__ import annotations

import copy as copylib
import dataclasses
import hashlib
import json
import random
import time

import numpy as np
import torch

from trainctl.contract.config import ConfigError

from . import device as devicelib
from .checkpoint import FORMAT
from .model import ema_device


@dataclasses.dataclass
class Progress:
    """Where training stands: the epoch, the sample cursor inside it, optimizer steps, samples seen."""
    epoch: int = 0
    cursor: int = 0
    step: int = 0
    samples_seen: int = 0
    nonfinite_steps: int = 0      # steps skipped because their loss was not finite (train.py), in all
    nonfinite_in_row: int = 0     # ... and in a row up to `step`: a resume must fail where the run would have


def to_cpu(obj):
    """Tensors moved to the CPU (a copy for tensors on another device; CPU tensors are shared, not copied)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def shares_training_memory(t) -> bool:
    """True when a captured payload still points into the live training state: training on the CPU, or an EMA
    kept in CPU memory ([ema] device = "cpu": its weights are captured as they are, and change only in the update
    after the optimizer's, which `Checkpointing.before_update` holds until the writer has read them)."""
    ema = getattr(t, "ema", None)
    return t.device.type == "cpu" or (ema is not None and ema_device(ema).type == "cpu")


def config_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def capture(t, background: bool = False) -> dict:
    """The checkpoint payload for trainer `t` (loadable with weights_only=True).

    Nothing state-sized is copied on the CPU: parameters and optimizer state stay shared with training.
    For a background write that is safe because training leaves them alone until its next optimizer
    step, and `Checkpointing.before_update` makes that step wait until the writer has read them. Model
    buffers can change in a forward pass (BatchNorm statistics), so a background capture clones them.
    """
    np_state = np.random.get_state(legacy=False)
    model = to_cpu(t.model.state_dict())
    if background and shares_training_memory(t):
        for name, _ in t.model.named_buffers():
            if name in model:
                model[name] = model[name].clone()
    return {
        "format": FORMAT,
        "model": model,
        "optimizer": to_cpu(t.optimizer.state_dict()),
        "scheduler": copylib.deepcopy(t.scheduler.state_dict()),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "progress": dataclasses.asdict(t.progress),
        "rng": {"python": random.getstate(),
                "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                          "pos": int(np_state["state"]["pos"]),
                          "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
                "torch": torch.get_rng_state(),
                "device": to_cpu(devicelib.rng_states(t.device))},
        "profile": dataclasses.asdict(t.profile),
        "profile_index": t.rung_index,
        "identity": t.identity,
        "config_hash": config_hash(t.identity),
        "history": list(t.history),
        **({"ema": capture_ema(t.ema)} if getattr(t, "ema", None) is not None else {}),
    }


def capture_ema(ema) -> dict:
    """What resumes timm's ModelEmaV3 exactly: its weights (its state_dict: "module." + the model's keys) and the
    state of its private generator (stochastic rounding of bfloat16 EMA weights). Its update count is the optimizer
    step (`Progress.step`), which ModelEmaV3.update is given; its settings come from the config (the identity)."""
    rounding = getattr(ema, "_sr_generator", None)   # timm versions before stochastic rounding have none
    return {"state": to_cpu(ema.state_dict()), "rounding_rng": rounding.get_state() if rounding is not None else None,
            "rounding_device": rounding.device.type if rounding is not None else None}


def restore_ema(t, state: dict) -> None:
    """Put the EMA back from checkpoint `state`, wherever it lives now; a checkpoint without one is refused."""
    saved = state.get("ema")
    if saved is None:   # the identity refuses this first ([ema] is in it when on): kept as the last word
        raise ConfigError("the checkpoint holds no EMA weights but [ema] enabled = true. Fix: set enabled = false "
                          "in the run's config.toml, or start a new run under another [run] name.")
    t.ema.load_state_dict(saved["state"])
    rng, rounding = saved.get("rounding_rng"), getattr(t.ema, "_sr_generator", None)
    # A generator's state only fits one of its kind: an EMA now on another device type starts its rounding afresh
    # (a rung change is exact up to summation order anyway).
    if rng is not None and rounding is not None and rounding.device.type == saved.get("rounding_device", "cpu"):
        rounding.set_state(rng)


class StepStart:
    """What an optimizer step changes before its update, kept as of the step's start, so that a step that fails
    midway can be undone exactly (the checkpoint at failure): the model's buffers (every train-mode forward pass
    moves BatchNorm's running statistics) and the RNG states the step re-seeds. Parameters, optimizer, scheduler
    and grad scaler change only in the update itself: nothing state-sized is copied. The copies are allocated once."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = device
        self.live = list(model.buffers())
        self.kept = [b.detach().clone() for b in self.live]
        self.rng: tuple | None = None
        self.time: float | None = None     # when training stood at the step's start (the checkpoint's "taken")

    def keep(self) -> None:
        """At the start of a step: before its first forward pass and before it re-seeds the RNG."""
        with torch.no_grad():
            for kept, live in zip(self.kept, self.live):
                kept.copy_(live)
        self.rng = (torch.get_rng_state(), devicelib.rng_states(self.device))
        self.time = time.time()

    def put_back(self) -> None:
        """Undo what the failed step changed outside the gradients."""
        with torch.no_grad():
            for kept, live in zip(self.kept, self.live):
                live.copy_(kept)
        if self.rng is not None:
            torch.set_rng_state(self.rng[0])
            devicelib.set_rng_states(self.device, self.rng[1])


def check_identity(saved: dict, current: dict, run_dir) -> None:
    """Refuse to resume when the settings a checkpoint depends on have changed."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if not changed:
        return
    details = "; ".join(f"{k}: checkpoint {_short(saved.get(k))} vs now {_short(current.get(k))}" for k in changed)
    raise ConfigError(f"the checkpoints in {run_dir} were made with different settings ({details}). "
                      f"Fix: restore those values in {run_dir}/config.toml, or start a new run under "
                      f"another [run] name.")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def restore(t, state: dict) -> None:
    """Put trainer `t` back exactly where checkpoint `state` was taken (on any device)."""
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])   # moves the state onto the params' device
    t.scheduler.load_state_dict(state["scheduler"])
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    t.progress = Progress(**state["progress"])
    t.history = list(state.get("history", []))
    if getattr(t, "ema", None) is not None:
        restore_ema(t, state)
    rng = state["rng"]
    random.setstate(_as_tuples(rng["python"]))
    np_rng = rng["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_rng["key"].numpy().astype(np.uint32), "pos": np_rng["pos"]},
                         "has_gauss": np_rng["has_gauss"], "gauss": np_rng["gauss"]})
    torch.set_rng_state(rng["torch"])
    if state["profile"].get("device") == t.profile.device:
        devicelib.set_rng_states(t.device, rng.get("device", {}))


def _as_tuples(obj):
    """random.setstate wants tuples; a round trip may hand back lists."""
    return tuple(_as_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj
