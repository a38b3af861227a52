"""What a worker builds before its first step (Trainer.setup): the device and the group, the data and its split,
the newest checkpoint that verifies, the model, its EMA and optimizer, the checkpoint writer and the loaders' data."""
from __future__ import annotations

import os

import torch

from trainctl.contract import fsio, manifest, split
from trainctl.contract.config import ConfigError, mixing_on
from trainctl.contract.fixed import identity
from trainctl.contract.protocol import Phase
from trainctl.contract.runfolder import Committed

from . import checkpoint, data, masks
from . import device as devicelib
from .checkpointing import Bystander, Checkpointing
from .mixup import Mixing
from .model import build_ema, build_model, build_optimizer, build_scheduler, recipe_for
from .report import say
from .snapshot import check_identity, restore
from .tensorboard_log import open_board


def build(t) -> None:
    """Everything trainer `t` needs before its first step: device, group, data, checkpoint, model, optimizer."""
    cfg, profile, g = t.cfg, t.profile, t.group
    start_device(t)
    t.reporter.beat(Phase.LOADING, force=True)
    t.train_set, t.val_set = split.train_and_val(cfg, say)   # val_dir, a held-out share (val_split), or none
    E = cfg.train.effective_batch_size
    t.accum = cfg.grad_accum(t.rung_index)
    t.steps_per_epoch = len(t.train_set) // E
    if t.steps_per_epoch == 0:
        raise ConfigError(f"[data] train_dir has {len(t.train_set)} images, fewer than one "
                          f"[train] effective_batch_size ({E}). Fix: add images or lower effective_batch_size.")
    t.total_steps = t.steps_per_epoch * cfg.train.epochs
    t.manifest = manifest.build(t.train_set)   # each file's path, class, size, mtime
    t.identity = {**identity(cfg), **manifest.identity(t.train_set, t.manifest)}
    t.verified = checkpoint.Verified(max_bytes=checkpoint_bound(t))
    state, found, skipped = load_checkpoint(t)
    t.timing("checkpoint_loaded")
    for name, why in skipped:
        say(f"skipping checkpoint {name}: {why}")
    if state is not None:
        check_identity(manifest.settings_only(state["identity"]), manifest.settings_only(t.identity), t.run_dir)
        manifest.check(state["identity"], t.manifest, t.train_set, t.run_dir)   # changed data: refused
    if g.main and (problem := manifest.keep(t.run_dir, t.manifest, t.train_set.root)):
        say(problem)
    torch.manual_seed(cfg.run.seed)   # the same initial weights on every fresh start
    # A resume may take the standby's model: built the same way, and the checkpoint replaces its weights and the
    # RNG states its build used. A fresh start builds from the seed after GO, exactly as without a standby.
    model = prebuilt_model(t) if state is not None else None
    t.prebuilt = None   # an unused one frees its memory before the build
    t.model = (model if model is not None
               else build_model(cfg, len(t.train_set.classes), load_weights=state is None))
    t.recipe = recipe_for(cfg, t.model)
    t.ema = build_ema(cfg, t.model, t.device)   # copied while the model is on the CPU
    t.model.to(t.device)
    t.net = g.wrap(t.model, t.device)   # what a training step calls: DDP in a group, else the model
    t.timing("model_built")
    t.optimizer = build_optimizer(cfg, t.model)
    t.scheduler = build_scheduler(cfg, t.optimizer, t.total_steps,
                                  round(cfg.train.warmup_epochs * t.steps_per_epoch))
    t.scaler = devicelib.grad_scaler(profile, t.device)
    if state is not None:
        restore(t, state)
        if g.main:
            say(f"resumed from {found.path.name}: epoch {t.progress.epoch + 1}, step {t.progress.step}, "
                f"sample {t.progress.cursor} of the epoch")
    t.ckpt = Checkpointing(t, background=cfg.checkpoint.async_write) if g.main else Bystander(t)
    t.board = open_board(t, resumed=state is not None, on=g.main)   # [logging] tensorboard; a no-op when off
    t.mean, t.std = data.pixel_stats(t.recipe, t.device)
    t.masks_on = bool(cfg.model.drop_path_rate or cfg.model.drop_rate)   # per-sample masks (masks.py)
    if t.masks_on:
        masks.install()
    t.mixing = (Mixing(cfg.augment, cfg.run.seed, E, t.recipe.size, len(t.train_set.classes),
                       cfg.train.label_smoothing) if mixing_on(cfg.augment) else None)
    t.train_data = data.MicroBatches(t.train_set, t.recipe, cfg.run.seed, profile.batch_size, True,
                                     cfg.augment, pairing=E if t.mixing else None)
    t.bad_share = data.BadShare(cfg.data.max_bad_share_step, cfg.data.max_bad_share_epoch,
                                cfg.train.effective_batch_size)
    t.workers = devicelib.loader_workers(profile, t.device)
    ranks = g.gather({"rank": g.rank, "pid": os.getpid(), "device": str(t.device),
                      "port": int(os.environ.get("MASTER_PORT", 0))}) if g.world > 1 else []   # the rendezvous
    t.reporter.beat(total_steps=t.total_steps, steps_per_epoch=t.steps_per_epoch, epochs=cfg.train.epochs,
                    device=str(t.device), batch_size=profile.batch_size, grad_accum=t.accum,
                    effective_batch_size=E, skipped_checkpoints=skipped, ranks=ranks, force=True, **t.position())


def start_device(t) -> None:
    """The rung's device (a rank of a group: its own GPU), the group's backend, torch's threads and determinism."""
    cfg, g = t.cfg, t.group
    t.device = devicelib.resolve(t.profile)
    if g.world > 1 and t.device.type == "cuda":   # one GPU per rank
        t.device = torch.device("cuda", g.local_rank)
        torch.cuda.set_device(t.device)
    devicelib.prepare(t.profile, t.device)
    g.start(t.profile, t.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    elif g.world > 1 and t.device.type == "cpu":   # K processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // g.world))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def load_checkpoint(t):
    """The newest checkpoint that verifies: (state, its Committed, skipped). In a group rank 0 chooses (and sets
    failures aside) and every other rank loads the very file it chose."""
    if not t.group.main:
        name = t.group.broadcast(None)
        if name is None:
            return None, None, []
        path = t.ckpt_dir / name
        return torch.load(path, map_location="cpu", weights_only=True), Committed(-1, path, {}), []
    for name in fsio.remove_stale_temps(t.ckpt_dir):   # we hold the worker lock: nobody writes these
        say(f"removed {name}, the remains of a checkpoint write that was interrupted")
    # Only what verifies is trusted: failures are set aside (checkpoints/corrupt/); when checkpoints existed
    # and none verifies, load_latest raises CannotContinue instead of starting over from step 0.
    try:
        state, found, skipped = checkpoint.load_latest(t.ckpt_dir, t.verified)
    except BaseException:
        t.group.broadcast(None)   # the others must not wait for a choice that will not come
        raise
    t.group.broadcast(found.path.name if found else None)
    return state, found, skipped


def prebuilt_model(t) -> torch.nn.Module | None:
    """The standby's model if it is what this boot would build, else None."""
    p = t.prebuilt
    return p.model if p is not None and p.fits(t.cfg, len(t.train_set.classes)) else None


def checkpoint_bound(t) -> int | None:
    """The most a checkpoint of this run can weigh (checkpoint.size_bound), from the model built on the meta
    device (no memory, nothing read; before any checkpoint is); None if a model cannot be built there."""
    if (model := prebuilt_model(t)) is None:   # else the same shapes, already built
        try:
            with torch.device("meta"):
                model = build_model(t.cfg, len(t.train_set.classes), load_weights=False)
        except Exception:   # noqa: BLE001 — the real build below reports real errors; sizes are then checked unbounded
            return None
    state = model.state_dict()
    return checkpoint.size_bound(state, extra=state if t.cfg.ema.enabled else None)   # the EMA's copy of it
