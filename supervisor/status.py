"""Everything `trainctl status` says, gathered from the run directory alone (supervisor alive or not)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from trainctl.worker.config import FROZEN_HEADER
from trainctl.worker.protocol import (BAD_IMAGES_FILE, CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, MODEL_FILE,
                                      REPORT_FILE, committed_checkpoints, read_heartbeat, read_json)

from . import runstate
from .journal import read_events
from .report import read_summary

FINAL = ("stopped", "succeeded", "failed")


def is_run_dir(path: Path) -> bool:
    """A folder with trainctl's frozen config (written by start, resume or service install)."""
    try:
        with open(Path(path) / CONFIG_FILE, encoding="utf-8") as f:
            return f.readline().startswith(FROZEN_HEADER)
    except OSError:
        return False


def gather(run_dir: Path) -> dict:
    """The status of one run as a JSON-ready dict (see README, 'trainctl status --json')."""
    run_dir = Path(run_dir)
    state = runstate.read_state(run_dir) or {}
    hb = read_heartbeat(run_dir) or {}
    alive = runstate.supervisor_alive(run_dir)
    recorded = state.get("state", "starting")
    now = time.time()
    out: dict = {"run_name": state.get("run_name", run_dir.name), "run_dir": str(run_dir),
                 "state": recorded, "reason": state.get("reason"), "supervisor_alive": alive,
                 "supervisor_pid": state.get("supervisor_pid") if alive else None,
                 "worker_pid": state.get("worker_pid") if alive else None,
                 "updated_at": state.get("updated_at"),
                 "last_seen_seconds": round(now - state["updated_at"], 1) if state.get("updated_at") else None}
    if not alive and recorded not in FINAL:
        # The recorded state is stale: nobody is running this run now.
        out["state"], out["recorded_state"] = "stopped", recorded
        out["reason"] = (f"supervisor not running — last seen {_ago(out['last_seen_seconds'])}, "
                         f"resume with: trainctl resume {run_dir.name}")
    profile = state.get("profile") or {}
    out["profile"] = {"index": state.get("profile_index"), "device": profile.get("device"),
                      "batch_size": profile.get("batch_size"), "grad_accum": state.get("grad_accum"),
                      "ladder_size": state.get("ladder_size")}
    out.update({"phase": hb.get("phase"), "step": hb.get("step", 0), "total_steps": hb.get("total_steps"),
                "epoch": hb.get("epoch"), "epochs": hb.get("epochs"), "samples_seen": hb.get("samples_seen", 0),
                "loss": hb.get("loss"), "lr": hb.get("lr"), "images_per_sec": hb.get("images_per_sec"),
                "val_acc": hb.get("val_acc")})
    out["eta_seconds"] = _eta(out, hb)
    out["memory"] = {**(state.get("memory") or {}),
                     **{k: v for k, v in hb.items() if k.startswith(("mps_", "cuda_"))}}
    out.update(_history(run_dir))
    out["restarts"] = out.pop("_restarts")
    ckpts = committed_checkpoints(run_dir / CHECKPOINT_DIR)
    out["last_checkpoint"] = ({"step": ckpts[-1].step, "path": str(ckpts[-1].path),
                               "age_seconds": round(now - ckpts[-1].marker.get("created", now), 1)}
                              if ckpts else None)
    model = run_dir / MODEL_FILE
    out["final_model"] = str(model) if model.exists() and out["state"] == "succeeded" else None
    out["bad_images"] = (read_json(run_dir / BAD_IMAGES_FILE) or {}).get("count", 0)
    out["metrics"] = recent_metrics(run_dir)
    out["report"] = str(run_dir / REPORT_FILE) if (run_dir / REPORT_FILE).exists() else None
    out["summary"] = read_summary(run_dir) if out["report"] else None
    return out


def _history(run_dir: Path) -> dict:
    crashes, restarts = [], 0
    for e in read_events(run_dir, ("exit", "restart", "step_down")):
        if e["kind"] == "exit":
            d = e["data"]
            if d.get("failure") in ("done", "stopped"):
                continue
            crashes.append({"at": _iso(e["time"]), "kind": d.get("failure"), "signal": d.get("signal"),
                            "exit_code": d.get("exit_code"), "profile_index": e["profile"], "step": e["step"],
                            "detail": d.get("detail"), "evidence": d.get("evidence")})
        else:
            restarts += 1
    return {"crashes": crashes, "_restarts": restarts}


def recent_metrics(run_dir: Path, keep: int = 40) -> dict:
    """The latest train losses/accuracies (one per step: a re-done step replaces the older line) and val accuracies."""
    train: dict[int, dict] = {}
    val: dict[int, float] = {}
    try:
        with open(Path(run_dir) / METRICS_FILE, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue   # a line cut by a crash
                if rec.get("kind") == "train":
                    train[rec["step"]] = rec
                elif rec.get("kind") == "val":
                    val[rec["epoch"]] = rec["val_acc"]
    except OSError:
        pass
    steps = sorted(train)[-keep:]
    return {"loss": [train[s]["loss"] for s in steps], "acc": [train[s]["acc"] for s in steps],
            "val_acc": [val[e] for e in sorted(val)]}


def _eta(out: dict, hb: dict) -> float | None:
    ips, total, step = out.get("images_per_sec"), out.get("total_steps"), out.get("step") or 0
    per_step = hb.get("effective_batch_size") or (hb.get("batch_size", 0) * hb.get("grad_accum", 0))
    if not ips or not total or not per_step or out["state"] not in ("running", "starting"):
        return None
    return round((total - step) * per_step / ips, 1)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def _ago(seconds) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
