"""Are the model's numbers finite? The pre-training sanity check (one forward/backward on a real batch), and what a
run whose loss is not finite is told (at its start, or after [train] max_nonfinite_steps steps in a row)."""
from __future__ import annotations

import math

import torch

from trainctl.contract.names import shell_run
from trainctl.contract.protocol import CannotContinue, Phase
from trainctl.contract.runfolder import SANITY_FILE

from .boot import passed_before, record_pass, sanity_key
from .report import say


class SanityCheckFailed(RuntimeError):
    """The pre-training forward/backward did not give a finite loss and finite gradients."""


def diverged_at_start(t, loss: float, weights_ok: bool) -> str:
    """Why trainer `t` refuses to train a model whose loss is already not finite before its first step."""
    where = f"the newest checkpoint (step {t.progress.step})" if t.progress.step else "the starting weights"
    what = ("holds weights that are not finite" if not weights_ok else
            f"gives a loss of {loss} on its next batch" if not math.isfinite(loss) else "gives gradients that are not finite")
    return (f"{where} {what}: the run had diverged; no model exported. Fix: start a new run (another [run] name) "
            f"with a lower [train] lr or with [train] grad_clip set" + _fp32_hint(t))


def _fp32_hint(t) -> str:
    """Reduced precision can overflow where fp32 does not: the ladder may change on resume."""
    if t.profile.precision == "fp32":
        return ""
    return (f"; or put precision = \"fp32\" in [[profiles]] and trainctl resume "
            f"{shell_run(t.run_dir)} --config FILE")


def diverged_message(t, limit: int) -> str:
    """Why trainer `t` gives up on a loss that stays non-finite, and what a person can do."""
    p = t.progress
    first = p.step - p.nonfinite_in_row + 1
    before = f"; the last finite loss was {t.last_finite[1]:.4g} at step {t.last_finite[0]}" if t.last_finite else ""
    return (f"the loss is not finite since step {first} ({p.nonfinite_in_row} steps in a row, "
            f"[train] max_nonfinite_steps = {limit}){before}; no model exported. Fix: start a new run (another "
            f"[run] name) with a lower [train] lr (this run's is {t.cfg.train.lr:g}) or with [train] grad_clip "
            f"set: a run's lr cannot change on resume" + _fp32_hint(t))


def _names(classes, shown: int = 5) -> str:
    return ", ".join(classes[:shown]) + (f", ... +{len(classes) - shown}" if len(classes) > shown else "")


def check(t) -> None:
    """One forward/backward on a real batch before training: finite loss and gradients. Once per run and rung:
    a later boot of the rung with the same config, device and software skips it (SANITY_FILE)."""
    key = sanity_key(t.cfg, t.rung_index, t.device)
    if (before := t.group.broadcast(passed_before(t.run_dir, key))) is not None:   # rank 0's word for all
        t.timing("sanity_done")
        if t.group.main:
            say(f"sanity check skipped: it passed on rung {t.rung_index + 1} ({t.device}) with this config "
                f"at step {before.get('step')} ({SANITY_FILE}); another rung or a resume --config runs it again")
        return
    t.reporter.beat(Phase.SANITY, force=True)
    p = t.progress
    mb = t.first_batch()
    t.reporter.bad_images(mb.bad)
    n_valid = int(mb.valid.sum())
    t.model.eval()   # eval: no running-stat updates, no RNG draws — training state stays untouched
    try:
        loss, _ = t.forward(mb, t.model)   # each rank its own batch: no collective
        loss.backward()
        grads_ok = all(torch.isfinite(q.grad).all() for q in t.model.parameters() if q.grad is not None)
    finally:
        t.model.zero_grad(set_to_none=True)
        t.model.train()
    value = loss.item() / max(n_valid, 1)
    if not math.isfinite(value) or not grads_ok:
        weights_ok = all(bool(torch.isfinite(q).all()) for q in t.model.parameters())
        if p.step > 0 or not weights_ok:
            # Not a fault a restart fixes: the checkpoint's model (or the one we start from) has diverged.
            raise CannotContinue("diverged", diverged_at_start(t, value, weights_ok))
        raise SanityCheckFailed(f"pre-training sanity check failed at step {p.step}: loss {value}, "
                                f"gradients {'finite' if grads_ok else 'not finite'}")
    try:
        if t.group.main:
            record_pass(t.run_dir, key, p.step)
    except OSError as e:   # a full disk: nothing lost but the skip, the next boot checks again
        say(f"could not record the sanity check in {SANITY_FILE} ({e.strerror or e}); the next boot runs it again")
    t.timing("sanity_done")
    params = sum(q.numel() for q in t.model.parameters())
    if t.group.main:
        group = f" x {t.group.world} processes" if t.group.world > 1 else ""
        say(f"sanity check passed: loss {value:.4f} | seed {t.cfg.run.seed} | device {t.device} | "
            f"model {t.cfg.model.name} ({params / 1e6:.2f}M params) | {len(t.train_set)} images, "
            f"{len(t.train_set.classes)} classes ({_names(t.train_set.classes)}) | "
            f"batch {t.profile.batch_size}{group} x accum {t.accum} "
            f"= {t.cfg.train.effective_batch_size} | {t.total_steps} steps")
