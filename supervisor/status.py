"""Everything `trainctl status` says, gathered from the run directory alone (supervisor alive or not)."""
from __future__ import annotations

import time
from pathlib import Path

import psutil

from trainctl.contract.config import FROZEN_HEADER
from trainctl.contract.lifecycle import Event, State, is_final
from trainctl.contract.names import shell_run
from trainctl.contract.protocol import ORPHAN_GRACE_SECONDS, read_heartbeat
from trainctl.contract.records import CheckpointStatus, Crash, RungStatus, Status, finite_only
from trainctl.contract.runfolder import (BAD_IMAGES_FILE, CHECKPOINT_DIR, CONFIG_FILE, EVIDENCE_DIR, MODEL_FILE,
                                         REPORT_FILE, WORKER_LOCK, newest_checkpoint, read_json,
                                         read_metrics, set_aside_checkpoints)

from . import runstate
from .journal import read_events
from .policy import CLEAN
from .report import read_summary
from .text import ago, finite


def is_run_dir(path: Path) -> bool:
    """A folder with trainctl's frozen config (written by start, resume or service install)."""
    try:
        with open(Path(path) / CONFIG_FILE, encoding="utf-8") as f:
            return f.readline().startswith(FROZEN_HEADER)
    except OSError:
        return False


def gather(run_dir: Path) -> Status:
    """The status of one run (README, 'trainctl status --json')."""
    run_dir = Path(run_dir)
    saved = runstate.read_state(run_dir)
    hb = read_heartbeat(run_dir)
    alive = runstate.supervisor_alive(run_dir)
    live = None if of_an_earlier_attempt(hb, saved) else hb   # what the worker of this attempt says now
    now = time.time()
    recorded = saved.state.value if saved else State.STARTING.value
    state, reason, stale = recorded, saved.reason if saved else None, None
    updated = finite(saved.updated_at) if saved else None
    seen_ago = round(now - updated, 1) if updated else None
    orphan = None
    if not alive and not is_final(recorded):
        # The recorded state is stale: no supervisor runs this run now (its worker may, for its grace period).
        state, stale = State.STOPPED.value, recorded
        reason = f"supervisor not running — last seen {ago(seen_ago)}, resume with: trainctl resume {shell_run(run_dir)}"
        orphan = orphaned_worker(run_dir, hb)
        if orphan is not None:
            state = State.STOPPING.value
            reason = (f"supervisor not running — last seen {ago(seen_ago)}; its worker (pid {orphan}) is still running:"
                      f" it checkpoints and exits by itself within about {ORPHAN_GRACE_SECONDS:.0f} s. Then resume with:"
                      f" trainctl resume {shell_run(run_dir)}")
    rung = (RungStatus(saved.rung_index + 1, saved.ladder_size, saved.rung.get("device"), saved.rung.get("batch_size"),
                       saved.grad_accum, saved.rung.get("nproc_per_node")) if saved else RungStatus())
    crashes, restarts, last_step = _history(run_dir)
    newest = newest_checkpoint(run_dir)
    # A booting worker's heartbeats say step 0 until it has loaded its checkpoint (they carry no total yet):
    # meanwhile the run stands where its newest checkpoint (or its last attempt) left it.
    placed = live is not None and live.total_steps is not None
    step = live.step if placed else newest.step if newest else last_step or 0
    worker_alive = alive and saved is not None and saved.worker_pid is not None
    # The report and its summary belong to the end the supervisor recorded; a resumed run's are the old end's.
    ended = is_final(recorded)
    model = run_dir / MODEL_FILE
    report = run_dir / REPORT_FILE
    return Status(
        run_name=saved.run_name if saved and saved.run_name else run_dir.name, run_dir=str(run_dir), state=state,
        reason=reason, supervisor_alive=alive, supervisor_pid=saved.supervisor_pid if alive and saved else None,
        worker_pid=saved.worker_pid if alive and saved else orphan, updated_at=updated, last_seen_seconds=seen_ago,
        rung=rung, phase=live.phase.value if live else None, step=step,
        total_steps=hb.total_steps if hb else None, epoch=live.epoch if placed else None,
        epochs=hb.epochs if hb else None, samples_seen=live.samples_seen if placed else 0,
        loss=finite(live.loss) if live else None, lr=finite(live.lr) if live else None,
        images_per_sec=finite(live.images_per_sec) if live else None, val_acc=finite(hb.val_acc) if hb else None,
        val_top5=finite(hb.val_top5) if hb else None, ema_val_acc=finite(hb.ema_val_acc) if hb else None,
        eta_seconds=_eta(state, live),
        memory={**((saved.memory if saved else None) or {}), **(hb.memory if hb else {})} if worker_alive else {},
        restarts=restarts, crashes=crashes,
        last_checkpoint=CheckpointStatus(newest.step, str(newest.path), round(now - newest.marker.get("created", now), 1),
                                         at_failure(newest.marker)) if newest else None,
        final_model=str(model) if model.exists() and state == State.SUCCEEDED else None,
        bad_images=(read_json(run_dir / BAD_IMAGES_FILE) or {}).get("count", 0),
        report=str(report) if ended and report.exists() else None,
        summary=finite_only(read_summary(run_dir)) if ended and report.exists() else None,
        recorded_state=stale, metrics=recent_metrics(run_dir),
        set_aside_checkpoints=set_aside_checkpoints(run_dir / CHECKPOINT_DIR),
        hang_timeout=saved.hang_timeout if saved else None, startup_timeout=saved.startup_timeout if saved else None,
        ranks=list(live.ranks) if live and worker_alive else [])


def at_failure(marker: dict) -> str | None:
    """What a checkpoint written at a failure says about it ("exception at step 1234"), else None."""
    failure = marker.get("failure")
    return failure[:200] if marker.get("reason") == "at_failure" and isinstance(failure, str) else None


def _history(run_dir: Path) -> tuple[list[Crash], int, int | None]:
    """The crashes, the restarts, and the step the last attempt to end had reached."""
    crashes, restarts, last_step = [], 0, None
    for e in read_events(run_dir, (Event.EXIT, Event.RESTART, Event.STEP_DOWN)):
        if e["kind"] != Event.EXIT:
            restarts += 1
            continue
        last_step = e["step"] if e["step"] is not None else last_step
        d = e["data"]
        if d.get("failure") in CLEAN:
            continue
        crashes.append(Crash(at=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(e["time"])), kind=d.get("failure"),
                             signal=d.get("signal"), exit_code=d.get("exit_code"), rung=(e["rung"] or 0) + 1,
                             step=e["step"], detail=d.get("detail"), evidence=_evidence(run_dir, d.get("evidence")),
                             rank=d.get("rank")))
    return crashes, restarts, last_step


def _evidence(run_dir: Path, recorded: str | None) -> str | None:
    """The crash's evidence file if it holds something (a SIGKILL leaves an empty fault log), else None.
    Looked for where it was written, then in this folder's evidence/ (the run folder may have moved)."""
    if not recorded:
        return None
    for path in (Path(recorded), run_dir / EVIDENCE_DIR / Path(recorded).name):
        try:
            if path.is_file() and path.stat().st_size > 0:
                return str(path)
        except OSError:
            continue
    return None


def recent_metrics(run_dir: Path, keep: int = 40) -> dict:
    """The latest train losses/accuracies (one per step: a re-done step replaces the older line) and val accuracies."""
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for rec in read_metrics(run_dir):
        if rec.get("kind") == "train":
            train[rec["step"]] = rec
        elif rec.get("kind") == "val":
            val[rec["epoch"]] = rec
    steps = sorted(train)[-keep:]
    recent = {"loss": [finite(train[s].get("loss")) for s in steps], "acc": [finite(train[s].get("acc")) for s in steps],
              "val_acc": [finite(val[e].get("val_acc")) for e in sorted(val)]}
    top5 = [finite(val[e]["val_top5"]) for e in sorted(val) if "val_top5" in val[e]]
    if top5:   # measured only past 5 classes (worker/validation.py): otherwise absent, never shown as 100%
        recent["val_top5"] = top5
    ema = [finite(val[e]["ema_val_acc"]) for e in sorted(val) if "ema_val_acc" in val[e]]
    if ema:   # [ema] enabled
        recent["ema_val_acc"] = ema
    return recent


def _eta(state: str, hb) -> float | None:
    if hb is None or state not in (State.RUNNING, State.STARTING):
        return None
    per_step = hb.effective_batch_size
    if not finite(hb.images_per_sec) or not hb.total_steps or not per_step:
        return None
    return finite(round((hb.total_steps - hb.step) * per_step / hb.images_per_sec, 1))


def of_an_earlier_attempt(hb, saved) -> bool:
    """A heartbeat left by an earlier attempt: the current one's worker has not spoken yet (a supervisor starting,
    a restart's backoff). Its phase, loss and speed are not the run's now."""
    if hb is None or saved is None:
        return False
    if hb.attempt != saved.attempt:
        return True
    return saved.state in (State.STARTING, State.BACKOFF) and hb.pid != saved.worker_pid


def orphaned_worker(run_dir: Path, hb) -> int | None:
    """The pid of a worker still running this run after its supervisor died (it holds worker.lock), else None."""
    if not runstate.held(Path(run_dir) / WORKER_LOCK):   # held: a worker (or, for an instant, another probe)
        return None
    if hb is not None and _wrote(hb.pid, hb.time):
        return hb.pid
    from .process import orphans   # the slow way (every process): a worker that has not beaten yet
    found = orphans(run_dir)
    return found[0].pid if found else None


def _wrote(pid: int, written_at: float | None) -> bool:
    """True if process `pid` is alive and is the one that wrote a heartbeat at `written_at` (pids are reused)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (written_at is None or proc.create_time() <= written_at + 1)
    except (psutil.Error, ValueError, TypeError):
        return False
