"""The training loop: exact, resumable at any optimizer step, on any rung of the ladder.

Per optimizer step the loop consumes one effective batch (``accum`` micro-batches), sums the
per-sample losses of the valid images, and divides the accumulated gradients by their count:
batch 8 x accum 2 and batch 4 x accum 4 compute the same update up to float summation order.
The global torch RNG is re-seeded from (seed, step) before every step, so dropout and friends
do not depend on where a restart happened.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainctl.contract.config import Config
from trainctl.contract.names import shell_run
from trainctl.contract.protocol import CannotContinue, ExitCode, Phase
from trainctl.contract.runfolder import CHECKPOINT_DIR

from . import data, export, masks, sanity, setup, validation
from . import device as devicelib
from .boot import Prebuilt
from .dist import Group
from .mixup import Mixing, soft_cross_entropy
from .model import scheduled_lr
from .report import Reporter, StepRate, say
from .sanity import diverged_message
from .snapshot import Progress, StepStart


# Where the training state stands, for the checkpoint at failure (Trainer.checkpoint_at_failure).
BETWEEN_STEPS = "between steps"                # exactly the state of the last completed optimizer step
IN_STEP = "in a step"                          # forward/backward passes began: undone from StepStart
UPDATING = "in the optimizer update"           # the weights are changing: no exact state to write
EPOCH_END = "in the end-of-epoch validation"   # the epoch's checkpoint holds the validation's result: none yet


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The global torch generator's seed for a step (any draw the model makes from it; drop path and dropout, when on,
    draw per sample instead: masks.py); each rank of a group its own."""
    words = [seed, step, 0x57E9] + ([rank] if rank else [])   # rank 0: the seed a single worker has always used
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, rung_index: int, flags, reporter: Reporter, faults,
                 prebuilt: Prebuilt | None = None, group: Group | None = None):
        self.cfg, self.run_dir, self.flags, self.reporter, self.faults = cfg, Path(run_dir), flags, reporter, faults
        self.group = group or Group()   # a rung of nproc_per_node > 1: this process's rank (dist.py)
        self.agreed_stop = False        # a group: a stop every rank has heard of (in the step's all-reduce)
        self.prebuilt = prebuilt   # a warm standby's model (prebuild), used by a resume if it fits
        self.rung_index, self.profile = rung_index, cfg.profiles[rung_index]
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        self.progress, self.history = Progress(), []
        self.micro_batches = 0
        self.rate = StepRate()
        self.last_finite: tuple[int, float] | None = None   # (step, mean loss) of this process's last finite step
        self.stage, self.step_start = BETWEEN_STEPS, None
        self.batches = None   # the loader's micro-batches (start_loading .. stop_loading)
        self.mixing: Mixing | None = None   # [augment] Mixup/CutMix over the effective batch (setup)
        self.ema = None       # [ema] enabled: timm's ModelEmaV3 of the model (setup)

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Device, group, data, the newest checkpoint that verifies, model and optimizer (setup.py)."""
        setup.build(self)

    def timing(self, event: str) -> None:
        """Wall-clock moments of this process's start-up (bench/recovery.py splits recovery time with them)."""
        self.reporter.fields.setdefault("timings", {})[event] = time.time()

    def position(self) -> dict:
        p = self.progress
        return {"epoch": p.epoch, "step": p.step, "cursor": p.cursor, "samples_seen": p.samples_seen}

    # ---- the parts of a step ------------------------------------------------------------------
    def inputs(self, mb: data.MicroBatch, device: torch.device | None = None) -> torch.Tensor:
        """uint8 → float on the rung's device (or `device`: an EMA kept on the CPU), normalised; then timm's random
        erasing of a training micro-batch ([augment])."""
        if device is not None and device != self.device:
            return data.normalize(mb.images.to(device), *data.pixel_stats(self.recipe, device))
        return data.erase(data.normalize(mb.images.to(self.device, non_blocking=True), self.mean, self.std), mb.erased)

    def forward(self, mb: data.MicroBatch, net: torch.nn.Module):
        """Summed loss over the valid samples, and the count of correct predictions, through `net` (the model, or
        its DDP wrapper in a training step of a group)."""
        x = self.inputs(mb)
        y = mb.labels.to(self.device)
        valid = mb.valid.to(self.device)
        targets = self._mix(mb, x, y) if self.mixing is not None else None   # mixes x in place
        with devicelib.autocast(self.profile, self.device):
            logits = net(x)
        losses = (F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=self.cfg.train.label_smoothing)
                  if targets is None else soft_cross_entropy(logits.float(), targets))
        # Masking keeps shapes fixed (MPS caches a graph per shape) and drops bad images exactly.
        return (losses * valid).sum(), ((logits.argmax(1) == y) & valid).sum()

    def _mix(self, mb: data.MicroBatch, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mixup/CutMix of the micro-batch with its partners (mixup.py): `x` mixed in place; the soft targets."""
        partner = mb.partner
        plan = self.mixing.plan(mb.epoch, mb.step)
        positions = list(range(mb.first_position, mb.first_position + len(y)))
        lam = self.mixing.mix(plan, positions, x, self.inputs(partner), partner.valid)
        return self.mixing.targets(y, partner.labels.to(self.device), lam)

    def sanity_check(self) -> None:
        """One forward/backward on a real batch before the first step (sanity.py); a method: bench/recipe_memory.py
        marks it."""
        sanity.check(self)

    # ---- the loop --------------------------------------------------------------------------------
    def start_loading(self) -> None:
        """Start the loader at the checkpoint's cursor, before the sanity check: its processes start and decode
        while the check runs, and the check takes the loader's first micro-batch (decoded once, not twice)."""
        cfg, p, E = self.cfg, self.progress, self.cfg.train.effective_batch_size
        self.timing("fit_start")
        keys = data.train_keys(p.epoch, p.cursor, cfg.train.epochs, self.steps_per_epoch, E, self.profile.batch_size,
                               self.group.share(self.profile.batch_size))
        self.batches = data.iterate(self.train_data, keys, self.workers, cfg.run.seed, self.device.type != "cpu")

    def first_batch(self) -> data.MicroBatch:
        """The loader's next micro-batch, kept for the training step that would have taken it."""
        mb = next(self.batches)
        self.batches = itertools.chain([mb], self.batches)
        return mb

    def stop_loading(self) -> None:
        """Shut the loader processes down now (the worker may leave by os._exit, which would orphan them)."""
        self.batches = None

    def fit(self) -> int:
        if self.batches is None:
            self.start_loading()
        try:
            return self._fit(self.batches)
        finally:
            self.stop_loading()

    def _fit(self, batches) -> int:
        cfg, p, E = self.cfg, self.progress, self.cfg.train.effective_batch_size
        self.reporter.beat(Phase.TRAINING, force=True, **self.position())
        self.step_start = StepStart(self.model, self.device)
        window = {"loss": 0.0, "correct": 0, "valid": 0}
        while p.epoch < cfg.train.epochs:
            if self._stopping():
                return self._stop()
            self.faults.hit("train_step", p.step)
            started, blocked = time.monotonic(), self.ckpt.blocked_seconds
            loss, correct, n_valid, finite = self._step(batches)
            # The step's own time: not the wait for a checkpoint write to release the weights (before_update).
            self.rate.add(time.monotonic() - started - (self.ckpt.blocked_seconds - blocked), E)
            p.step, p.cursor, p.samples_seen = p.step + 1, p.cursor + E, p.samples_seen + E
            self.stage = BETWEEN_STEPS
            if "first_step" not in self.reporter.fields.get("timings", {}):
                self.timing("first_step")
            self._count_finite(finite, loss / max(n_valid, 1))
            if finite:   # a skipped step's NaN would make the whole window's mean NaN
                window.update(loss=window["loss"] + loss, correct=window["correct"] + correct,
                              valid=window["valid"] + n_valid)
            # Written at every step (not throttled): a crash report must name the step exactly.
            self.reporter.beat(loss=loss / max(n_valid, 1) if finite else None, lr=self._lr(),
                               images_per_sec=self._images_per_sec(), nonfinite_steps=p.nonfinite_steps,
                               force=True, memory=devicelib.memory_stats(self.device),
                               checkpoint_write_seconds=round(self.ckpt.writer.write_seconds, 3), **self.position())
            if p.nonfinite_in_row >= cfg.train.max_nonfinite_steps:   # restarting cannot help: a person must look
                raise CannotContinue("diverged", diverged_message(self, cfg.train.max_nonfinite_steps))
            if p.step % cfg.train.log_every_steps == 0:
                self._log(window)
                window = {"loss": 0.0, "correct": 0, "valid": 0}
            if p.cursor >= self.steps_per_epoch * E:
                self._end_epoch()
            elif self._stopping():
                return self._stop()
            else:
                self.ckpt.after_step()
        self.ckpt.finish()
        self.timing("export_start")
        if self.group.main:
            export.write(self)
        self.timing("exported")
        return ExitCode.OK

    def _stopping(self) -> bool:
        """A stop was asked for; in a group, one every rank knows of by now (agreed in the step's all-reduce)."""
        return self.flags.stop if self.group.world == 1 else self.agreed_stop

    def _step(self, batches) -> tuple[float, int, int, bool]:
        """One optimizer step over `accum` micro-batches; returns (summed loss, correct, valid, finite).

        A step whose loss (or, with grad_clip, gradient norm) is not finite is skipped: no update, its
        gradients dropped. The decision depends only on the step's own numbers, so it is the same on resume;
        with all numbers finite the step is exactly what it was before this check existed."""
        self.step_start.keep()   # before the re-seeding and the first forward pass: what a failure here undoes
        self.stage = IN_STEP
        torch.manual_seed(step_seed(self.cfg.run.seed, self.progress.step, self.group.rank))
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        n_valid = 0
        self.bad_share.begin_step(self.progress.epoch, self.progress.step)
        for i in range(self.accum):
            mb = next(batches)
            bad = self._bad_images(mb)
            self._check_data_source(mb, bad, clean=i == 0)
            # A group sums the gradients over its ranks once, at the step's last micro-batch.
            alone = self.net.no_sync() if self.group.world > 1 and i < self.accum - 1 else contextlib.nullcontext()
            with alone, self._masks(i):
                loss, right = self.forward(mb, self.net)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()
            correct += right
            n_valid += int(mb.valid.sum())
            self.micro_batches += 1
            self.faults.hit("micro_batch", self.progress.step)   # test-only: a failure in the middle of a step
            devicelib.after_micro_batch(self.profile, self.device, self.micro_batches)
            self.reporter.beat()
        grads = [q.grad for q in self.model.parameters() if q.grad is not None]
        self.ckpt.before_update()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.faults.nan_loss:   # test-only (worker/faults.py): this step's loss comes out NaN
            self.faults.nan_loss, loss_sum = False, loss_sum * float("nan")
        total, right = float(loss_sum), int(correct)
        if self.group.world > 1:   # the whole effective batch's numbers, and whether any rank was asked to stop
            total, right, n_valid, stops = self.group.sum([total, right, n_valid, float(self.flags.stop)], self.device)
            right, n_valid, self.agreed_stop = int(right), int(n_valid), stops > 0
        finite = math.isfinite(total)
        self.stage = UPDATING
        if finite and n_valid and grads:
            torch._foreach_div_(grads, float(n_valid))   # mean over the effective batch's valid images
            if self.cfg.train.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
                # With a grad scaler an infinite norm is the scaler's business: it skips the step and backs off.
                finite = self.scaler is not None or math.isfinite(float(norm))
            if self.scaler:
                self.scaler.step(self.optimizer)
            elif finite:
                self.optimizer.step()
            if finite and self.ema is not None:   # once per optimizer step, never per micro-batch: the same on every rung
                self.ema.update(self.model, step=self.progress.step + 1)   # the run's step count: exact warmup on resume
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_update(num_updates=self.progress.step + 1)
        return total, right, n_valid, finite

    def checkpoint_at_failure(self, what: str) -> None:
        """After a caught failure (main.py): write the state of the last completed optimizer step, exactly as the
        checkpoint taken at that step's end would have been; the failed step's partial gradients, buffer updates
        and RNG draws are dropped first, and the memory they held freed, so the write itself has room."""
        failure = f"{what} at step {self.progress.step}"
        if self.stage in (UPDATING, EPOCH_END):
            say(f"{failure}, {self.stage}: no checkpoint at failure (the state is not that of a step's end); the "
                f"next attempt resumes from the newest checkpoint, step {self.ckpt.committed_step}")
            return
        self.model.zero_grad(set_to_none=True)   # the failed step's partial gradients
        taken = None
        if self.stage == IN_STEP:
            self.step_start.put_back()
            taken = self.step_start.time
        gc.collect()
        devicelib.empty_cache(self.device)
        self.ckpt.at_failure(failure, taken)

    def _count_finite(self, finite: bool, mean_loss: float) -> None:
        """Count a skipped (non-finite) step; at `[train] max_nonfinite_steps` in a row the run has diverged (fit).

        The counts are part of `Progress`, so they are in every checkpoint: a resumed run fails at the same step."""
        p = self.progress
        if finite:
            p.nonfinite_in_row, self.last_finite = 0, (p.step, mean_loss)
            return
        p.nonfinite_in_row, p.nonfinite_steps = p.nonfinite_in_row + 1, p.nonfinite_steps + 1
        limit = self.cfg.train.max_nonfinite_steps
        if p.nonfinite_in_row < limit:
            say(f"step {p.step}: loss not finite, step skipped (no update; {p.nonfinite_in_row} in a row, "
                f"the run fails at [train] max_nonfinite_steps = {limit})")

    def _masks(self, i: int):
        """Drop path and dropout masks for micro-batch i of the step, per sample (masks.py): by the place of its
        samples in the effective batch, which a group's rank shares as data.train_keys does."""
        if not self.masks_on:
            return contextlib.nullcontext()
        b, g = self.profile.batch_size, self.group
        return masks.MASKS.drawing(self.cfg.run.seed, self.progress.step, i * b * g.world + g.rank * b, b)

    def _bad_images(self, mb: data.MicroBatch) -> list[tuple[str, str]]:
        """The micro-batch's unreadable files, reported; in a group, those of every rank's share of it (gathered
        only when there are some), so that every rank judges the data source on the same numbers."""
        bad = mb.bad
        if self.group.world > 1 and self.group.sum([len(bad)], self.device)[0]:
            bad = [b for share in self.group.gather(bad) for b in share]
        if bad:
            self.reporter.bad_images(bad)
        return bad

    def _check_data_source(self, mb: data.MicroBatch, bad: list[tuple[str, str]], clean: bool) -> None:
        """Stop before training on blanks when too many images are unreadable: the data source is failing."""
        fault = self.bad_share.count(len(mb.labels) * self.group.world, bad)
        if fault is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        if clean:   # no forward pass of this step yet: the state is exactly that of the step boundary
            self.ckpt.stop()
        else:       # forward passes have touched it (BatchNorm statistics): keep the last committed checkpoint
            self.ckpt.finish()
        cause = data.likely_cause(self.train_set.root, self.bad_share.files)
        name = shell_run(self.run_dir)
        raise CannotContinue("data_error", (
            f"{fault}: {cause}. Stopped rather than train on blanks; the checkpoint at step {self.ckpt.committed_step} "
            f"holds the last good state. Fix: bring the data back (restore or remount it), then: trainctl resume {name}; "
            f"if the files themselves are broken, remove them and start a new run, or allow more with [data] "
            f"max_bad_share_step / max_bad_share_epoch: trainctl resume {name} --config FILE."))

    def _lr(self) -> float:
        """The scheduled LR (with [train] layer_decay, the top layer's: the lower layers' are scaled down from it)."""
        return scheduled_lr(self.optimizer)

    def _images_per_sec(self) -> float | None:
        """The smoothed rate (report.StepRate) that the heartbeat, the metrics lines and the ETA share."""
        rate = self.rate.per_second
        return None if rate is None else round(rate, 2)

    def _log(self, w: dict) -> None:
        if self.group.world > 1:   # each rank's device memory, beside its pid; rank 0 speaks for the group
            memory = self.group.gather(devicelib.memory_stats(self.device))
            ranks = self.reporter.fields.get("ranks") or []
            self.reporter.beat(ranks=[{**r, "memory": m} for r, m in zip(ranks, memory)])
            if not self.group.main:   # its loss and accuracy are the group's already (reduced in the step)
                return
        p = self.progress
        epoch_samples = max(self.steps_per_epoch * self.cfg.train.effective_batch_size, 1)
        trained = w["valid"] > 0 or not p.nonfinite_in_row   # every step of the window skipped: no loss to show
        record = {"kind": "train", "step": p.step, "epoch": p.epoch + p.cursor / epoch_samples,
                  "loss": w["loss"] / max(w["valid"], 1) if trained else None,
                  "acc": w["correct"] / max(w["valid"], 1) if trained else None,
                  "lr": self._lr(), "images_per_sec": self._images_per_sec(),
                  "rung": self.rung_index + 1, "nonfinite_steps": p.nonfinite_steps}
        self.reporter.metric(record)
        self.board.train(record, devicelib.memory_stats(self.device))
        shown = f"loss {record['loss']:.4f} acc {record['acc']:.3f}" if trained else "loss not finite (steps skipped)"
        say(f"step {p.step}/{self.total_steps} epoch {record['epoch']:.2f} {shown} "
            f"lr {record['lr']:.2e} {record['images_per_sec'] or 0:.1f} img/s")

    def _end_epoch(self) -> None:
        p = self.progress
        self.stage = EPOCH_END
        finished = p.epoch + 1
        if self.val_set is not None:
            scores = validation.validate(self)
            self.history.append({"epoch": finished, "step": p.step, **scores})
            record = {"kind": "val", "epoch": finished, "step": p.step,
                      **{k: v if math.isfinite(v) else None for k, v in scores.items()}}   # JSON has no NaN
            self.reporter.metric(record)
            self.board.val(record)
            self.reporter.beat(val_acc=scores["val_acc"], val_top5=scores.get("val_top5"),
                               ema_val_acc=scores.get("ema_val_acc"))
            if self.group.main:
                say(f"epoch {finished}/{self.cfg.train.epochs} validation: {validation.scores_text(scores, '')}"
                    + (f"; EMA: {validation.scores_text(scores, 'ema_')}" if "ema_val_acc" in scores else ""))
        p.epoch, p.cursor = finished, 0
        self.stage = BETWEEN_STEPS
        self.ckpt.snapshot("epoch")

    def _stop(self) -> int:
        self.ckpt.stop()
        self.group.barrier()   # no rank leaves before rank 0's checkpoint is durable (torchrun would end it)
        if self.group.main:
            say(f"stopped at step {self.progress.step} ({self.flags.stop_reason or 'another rank was asked to'})")
        return ExitCode.STOPPED
