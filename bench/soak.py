"""The overnight soak, in minutes: a chaos process kills a supervised run at random moments, again and again.

    python bench/soak.py --faults 200              # the RELIABILITY.md figures (~30 min on 2 cores)
    pytest -m soak                                 # a short soak (20 faults) as a test

Rounds of the same small training (one CPU rung) run under `trainctl service run` — the start command
a service manager uses. While a round trains, faults are injected one at a time, each once the
previous one has been recovered from: SIGKILL / SIGSEGV / SIGBUS / SIGABRT / SIGSTOP (a hang) sent to
the worker, SIGKILL to the supervisor, SIGKILL to both at once, in-process faults at random steps (a
Python exception, an out-of-memory error — before a step, and in the middle of one — memory growth past the
hard limit), and an exception inside
the supervisor itself (it must stop the worker at a checkpoint and exit 70), and two hostile checkpoint
faults followed by a SIGKILL: a byte flipped in the newest committed checkpoint (`corrupt_newest`; the
run must resume from the previous good one), and a forged marker for a step far beyond the run's end,
with a data file whose CRC does not match (`forged_marker`; it must be set aside, nothing good pruned,
and the run resume from its real newest). The soak restarts the
service as systemd's unit would: after any exit but 0, 1 (failed) and 3 (bad config). Then it checks,
for every round: the run succeeded; model.safetensors is bit-identical to an uninterrupted reference
run; every checkpoint ever seen committed verified and loaded; no process of the run is left; the
journal accounts for every fault with the right kind; every checkpoint the soak damaged was set aside
in checkpoints/corrupt/ (and is left out of "verified": the soak broke it, not the run).
Work lost is counted from the step the next attempt really resumed at (its own "resumed from" log line), so a
corrupted newest checkpoint honestly costs up to two intervals (the previous good one is at most
`every_steps` older): its bound is 2 x every_steps, every other fault's stays every_steps.
It prints a table (faults by kind, recoveries, work lost per fault, goodput) and exits 1 on any miss.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from trainctl.contract.lifecycle import Event, State
from trainctl.contract.protocol import ExitCode, Heartbeat, Phase, read_heartbeat
from trainctl.contract.runfolder import checkpoint_path, committed_checkpoints, marker_path, set_aside_checkpoints
from trainctl.supervisor.demo_data import make_dataset, small_config
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.process import run_processes
from trainctl.supervisor.runstate import read_state, supervisor_alive
from trainctl.supervisor.service import FINAL_EXIT_CODES
from trainctl.supervisor.waiting import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import frozen_run  # noqa: E402

# The soak's run is the demo's small run (one CPU rung) with these [supervisor] keys.
SUPERVISOR = {
    "backoff_seconds": [0.2],
    "poll_seconds": 0.2,
    "hang_timeout_seconds": 6,
    # A SIGSTOP may land while a worker boots (it takes ~4 s here); the default 900 s allowance for a slow
    # boot (a big folder scan, a first model load) would stall the soak for 15 minutes.
    "startup_timeout_seconds": 30,
    # The soak tests recovery, not the give-up policy (which has its own tests): random faults may hit
    # one step twice, or a rung many times without a checkpoint in between.
    "max_restarts_per_profile": 1000,
    "same_step_limit": 1000,
    "memory_soft_limit": "",
    # A growing worker stops beating: growth (~160 MB/s from ~0.8 GB; normal peak 0.93 GB) must reach
    # this well before the 6 s hang timeout fires, or it is (rightly) called a hang.
    "memory_hard_limit": "1.2GB",
    "keep_awake": False,
}
# kind -> (weight, expected journal classification of the worker's exit; None = a supervisor fault)
FAULTS = {
    "sigkill": (25, "killed"), "sigsegv": (12, "native_crash"), "sigbus": (10, "native_crash"),
    "sigabrt": (10, "native_crash"), "hang": (8, "hang"), "supervisor": (10, None), "both": (8, "killed"),
    "exception": (6, "exception"), "oom": (6, "oom"), "memory": (5, "memory_limit"),
    "supervisor_error": (6, "supervisor_error"), "corrupt_newest": (6, "killed"), "forged_marker": (6, "killed"),
    # in the middle of an optimizer step (after its first micro-batch): the checkpoint at failure must undo the
    # half-done step (its gradients, BatchNorm statistics) and still end bit-identical
    "exception_mid_step": (6, "exception"), "oom_mid_step": (6, "oom"),
}
SABOTAGE = ("corrupt_newest", "forged_marker")   # damage the checkpoints, then SIGKILL the worker
FORGED_STEP = 999_999_999
SIGNALS = {"sigkill": signal.SIGKILL, "sigsegv": signal.SIGSEGV, "sigbus": signal.SIGBUS,
           "sigabrt": signal.SIGABRT, "hang": signal.SIGSTOP}
IN_PROCESS = {"exception": "exception", "oom": "cpu_oom", "memory": "grow_memory"}
PLANTED = {**{k: f"train_step:{a}" for k, a in IN_PROCESS.items()}, "supervisor_error": "supervisor:exception",
           "exception_mid_step": "micro_batch:exception", "oom_mid_step": "micro_batch:cpu_oom"}
NOT_RESTARTED = (ExitCode.OK, *FINAL_EXIT_CODES)   # what the unit does not restart


def make_run(root: Path, name: str, epochs: int, every: int) -> Path:
    return frozen_run(root / f"{name}.toml", small_config(
        name, "data/train", run={"seed": 3}, train={"epochs": epochs, "log_every_steps": 20},
        checkpoint={"every_steps": every, "every_seconds": 0, "keep_last": 3}, supervisor=SUPERVISOR))


def start_service(run_dir: Path, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainctl.supervisor.command", "service", "run", str(run_dir)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def restarted(service: subprocess.Popen, run_dir: Path, env: dict, log) -> subprocess.Popen:
    """What systemd does with an exited service (`Restart=on-failure`, RestartSec shortened to 0.5 s)."""
    if service.poll() is None or service.returncode in NOT_RESTARTED:
        return service
    time.sleep(0.5)
    return start_service(run_dir, env, log)


class Checkpoints:
    """Every checkpoint ever seen committed must verify (size, CRC-32) and load with weights_only — except
    those the soak damaged itself (`sabotaged`), which must instead end up set aside."""

    def __init__(self):
        self.seen: dict[tuple, bool] = {}
        self.sabotaged: set[tuple] = set()

    def check(self, run_dir: Path) -> None:
        for c in committed_checkpoints(run_dir / "checkpoints"):
            key = (str(run_dir), c.step, c.marker.get("crc32"))
            if key in self.seen or key in self.sabotaged:
                continue
            try:
                data = c.path.read_bytes()
            except FileNotFoundError:
                continue   # pruned between listing and reading: it was fine while it existed
            ok = len(data) == c.marker["size"] and f"{zlib.crc32(data):08x}" == c.marker["crc32"]
            if ok:
                try:
                    torch.load(c.path, map_location="cpu", weights_only=True)
                except FileNotFoundError:
                    continue
                except Exception:
                    ok = False
            self.seen[key] = ok


def sabotage(kind: str, run_dir: Path, checkpoints: Checkpoints) -> str | None:
    """Damage the run's checkpoints as `kind` says; return the file damaged, or None while the run has no
    good checkpoint to fall back on (then the fault waits)."""
    folder = run_dir / "checkpoints"
    good = [c for c in committed_checkpoints(folder) if (str(run_dir), c.step, c.marker.get("crc32"))
            not in checkpoints.sabotaged]
    if kind == "corrupt_newest":
        if len(good) < 2:
            return None
        target = good[-1]
        checkpoints.sabotaged.add((str(run_dir), target.step, target.marker.get("crc32")))
        try:
            with open(target.path, "r+b") as f:   # one byte flipped in place, as bit rot would
                f.seek(target.marker["size"] // 2)
                b = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([b[0] ^ 0xFF]))
        except (FileNotFoundError, IndexError):
            return None   # pruned meanwhile
        return target.path.name
    if not good:
        return None
    path = checkpoint_path(folder, FORGED_STEP)
    data = os.urandom(4096)
    crc = f"{zlib.crc32(data) ^ 1:08x}"   # wrong on purpose
    path.write_bytes(data)
    marker_path(path).write_text(json.dumps({"format": 1, "step": FORGED_STEP, "file": path.name, "size": len(data),
                                             "crc32": crc, "created": time.time()}))
    checkpoints.sabotaged.add((str(run_dir), FORGED_STEP, crc))
    return path.name


def current_worker(run_dir: Path) -> Heartbeat | None:
    """The heartbeat of the worker the live supervisor is running now, or None."""
    state, hb = read_state(run_dir), read_heartbeat(run_dir)
    if state and hb and state.state in (State.RUNNING, State.STARTING) and hb.attempt == state.attempt \
            and state.worker_pid == hb.pid and supervisor_alive(run_dir):
        return hb
    return None


def about_to_fire(planted: dict[int, str], step: int, run_dir: Path) -> bool:
    """A planted fault is due about now: the worker's at its exact step; the supervisor's at its first look
    from its step on (looks are 0.2 s apart, several steps), until it has fired."""
    if any(step + d in planted for d in (-1, 0, 1, 2)):
        return True
    fired = len(read_events(run_dir, (Event.SUPERVISOR_ERROR,)))
    pending = sorted(at for at, kind in planted.items() if kind == "supervisor_error")[fired:]
    return any(step + 2 >= at for at in pending)


def soak_round(root: Path, number: int, budget: int, rng: random.Random, kinds: list[str], epochs: int,
               every: int, ledger: list, checkpoints: Checkpoints, log) -> Path:
    """One training run under chaos; appends each injected fault to `ledger`."""
    run_dir = make_run(root, f"soak-{number:03d}", epochs, every)
    total = epochs * 6
    planned = rng.choices(kinds, [FAULTS[k][0] for k in kinds], k=budget)
    # In-process faults are planted at random steps of this round through the fault hooks of the worker
    # and the supervisor.
    steps = iter(rng.sample(range(2, total - 1), k=min(budget, total - 3)))
    planted = {next(steps): k for k in planned if k in PLANTED}
    env = {**os.environ, "TRAINCTL_FAULTS": ",".join(f"{PLANTED[k]}@{step}:once" for step, k in planted.items())}
    service = start_service(run_dir, env, log)
    external = [k for k in planned if k not in PLANTED]
    while external:
        service = restarted(service, run_dir, env, log)
        if service.poll() is not None:
            break
        try:   # a service that exits meanwhile (a planted supervisor error: 70) is restarted at the loop's top
            wait_for(lambda: current_worker(run_dir) or service.poll() is not None, 120, what="a training worker")
        except TimeoutError:
            break
        time.sleep(rng.uniform(0, 2.5))
        hb = current_worker(run_dir)
        if hb is None or hb.phase in (Phase.EXPORTING, Phase.DONE):
            continue
        if about_to_fire(planted, hb.step, run_dir):
            continue   # one fault at a time
        kind = external[0]
        try:
            worker = psutil.Process(hb.pid)
        except psutil.Error:
            continue
        damaged = sabotage(kind, run_dir, checkpoints) if kind in SABOTAGE else None
        if kind in SABOTAGE and damaged is None:
            continue   # no good checkpoint to fall back on yet
        external.pop(0)
        entry = {"round": number, "kind": kind, "time": time.time(), "attempt": hb.attempt,
                 "step": hb.step, "phase": hb.phase.value, **({"damaged": damaged} if damaged else {})}
        try:
            if kind in SIGNALS:
                worker.send_signal(SIGNALS[kind])
            elif kind in SABOTAGE:
                worker.send_signal(signal.SIGKILL)
            elif kind == "supervisor":
                service.kill()
            else:   # both at once
                worker.send_signal(signal.SIGKILL)
                service.kill()
        except psutil.Error:
            continue
        ledger.append(entry)
        if kind in ("supervisor", "both"):
            service.wait()
            time.sleep(0.5)                               # systemd's RestartSec, shortened
            service = start_service(run_dir, env, log)
        # recovered = a newer attempt trains (or the run is over); the checks afterwards tell if it never did
        try:
            wait_for(lambda: (cw := current_worker(run_dir)) and cw.attempt > entry["attempt"]
                     or service.poll() is not None, 240, what="the recovery")
        except TimeoutError:
            pass
        checkpoints.check(run_dir)
    while (service := restarted(service, run_dir, env, log)).poll() is None:
        service.wait(timeout=1800)
    checkpoints.check(run_dir)
    # The planted faults that fired: every failed exit at a planted step that no external fault explains,
    # whatever it was classified as (`account` then checks the classification); every supervisor error.
    external_attempts = {f["attempt"] for f in ledger if f["round"] == number}
    for e in read_events(run_dir, (Event.EXIT, Event.SUPERVISOR_ERROR)):
        if e["kind"] == Event.SUPERVISOR_ERROR:
            kind = "supervisor_error"
            planted.pop(next((s for s, k in planted.items() if k == kind), None), None)
        elif e["data"]["failure"] not in ("done", "stopped") and e["step"] in planted \
                and e["attempt"] not in external_attempts:
            kind = planted.pop(e["step"])
        else:
            continue
        ledger.append({"round": number, "kind": kind, "time": e["time"], "attempt": e["attempt"],
                       "step": e["step"], "phase": "training"})
    return run_dir


def resumed_steps(run_dir: Path) -> dict[int, int]:
    """The step each attempt really resumed at, from its own "resumed from ...: step S" line in logs/worker.log
    (the supervisor's spawn event can only name the newest checkpoint that passes the cheap checks)."""
    out, attempt = {}, None
    try:
        text = (run_dir / "logs" / "worker.log").read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if m := re.match(r"=== attempt (\d+),", line):
            attempt = int(m.group(1))
        elif attempt is not None and (m := re.search(r"resumed from step-\d+\.pt: epoch \d+, step (\d+),", line)):
            out.setdefault(attempt, int(m.group(1)))
    return out


def account(run_dir: Path, ledger: list, step_seconds: float) -> None:
    """Match every fault of this round with the journal; fill in classification and work lost.

    Work lost = the optimizer steps the next attempt had to do again, in steps and in seconds of
    training (steps x the reference run's seconds per step): from the step where the fault hit to the step
    the next attempt really resumed at, in the worker's own words ("resumed from ...: step S" in its log;
    the spawn's step, the supervisor's view from the cheap checks, when it said nothing). A damaged
    checkpoint must have been set aside.
    """
    events = read_events(run_dir)
    exits = {e["attempt"]: e for e in events if e["kind"] == "exit"}
    spawns = sorted((e for e in events if e["kind"] == "spawn"), key=lambda e: e["time"])
    resumed = resumed_steps(run_dir)
    set_aside = [b["was"] for b in set_aside_checkpoints(run_dir / "checkpoints")]
    starts = [e["time"] for e in events if e["kind"] == "supervisor_start"]
    for f in (f for f in ledger if f["round_dir"] == str(run_dir)):
        expected = FAULTS[f["kind"]][1]
        nxt = next((s for s in spawns if s["time"] > f["time"] and s["attempt"] > f["attempt"]), None)
        f["resumed_at"] = resumed.get(nxt["attempt"], nxt["step"] or 0) if nxt else None
        if expected is None:            # the supervisor died: a new one must have started
            f["classified"] = "supervisor_restart" if any(t > f["time"] for t in starts) else None
            f["ok"] = f["classified"] is not None
        elif expected == "supervisor_error":   # found in the journal; the service must have started a new one
            f["classified"] = expected if any(t > f["time"] for t in starts) else None
            f["ok"] = f["classified"] is not None
        else:
            ended = exits.get(f["attempt"])
            f["classified"] = ended["data"]["failure"] if ended else ("(supervisor died)" if f["kind"] == "both" else None)
            f["ok"] = f["classified"] == expected or (f["kind"] == "both" and f["classified"] == "(supervisor died)")
        if f.get("damaged"):
            f["set_aside"] = f["damaged"] in set_aside
            f["ok"] = f["ok"] and f["set_aside"]
        at = exits[f["attempt"]]["step"] if f["attempt"] in exits else f["step"]
        f["lost_steps"] = max(0, at - f["resumed_at"]) if f["resumed_at"] is not None else 0
        f["lost_seconds"] = round(f["lost_steps"] * step_seconds, 3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=200, help="faults to inject in all (default 200)")
    parser.add_argument("--per-round", type=int, default=10, help="faults per training run")
    parser.add_argument("--epochs", type=int, default=60, help="epochs of 6 steps per run")
    parser.add_argument("--every", type=int, default=10, help="[checkpoint] every_steps")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--kinds", default=",".join(FAULTS), help="the fault kinds to draw from (default: all)")
    parser.add_argument("--dir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = args.dir or Path(tempfile.mkdtemp(prefix="trainctl-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    make_dataset(root / "data", per_class_train=24, per_class_val=0, size=40, seed=1)
    started = time.monotonic()
    reference = make_run(root, "reference", args.epochs, args.every)
    subprocess.run([sys.executable, "-m", "trainctl.worker", "--run-dir", str(reference)], check=True,
                   stdout=subprocess.DEVNULL)
    ref = load_file(str(reference / "model.safetensors"))
    speeds = [json.loads(line)["images_per_sec"] for line in (reference / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    step_seconds = 16 / statistics.median(speeds)
    ledger, rounds, checkpoints = [], [], Checkpoints()
    with open(root / "soak.log", "ab") as log:
        number = 0
        while len(ledger) < args.faults:
            number += 1
            before = len(ledger)
            run_dir = soak_round(root, number, min(args.per_round, args.faults - len(ledger)), rng,
                                 args.kinds.split(","), args.epochs, args.every, ledger, checkpoints, log)
            for f in ledger[before:]:
                f["round_dir"] = str(run_dir)
            account(run_dir, ledger, step_seconds)
            got = load_file(str(run_dir / "model.safetensors")) if (run_dir / "model.safetensors").exists() else {}
            try:
                left = wait_for(lambda: not run_processes(run_dir), 30, what="the run's processes to end")
            except TimeoutError:
                left = False
            state = read_state(run_dir)
            summary = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").exists() else {}
            rounds.append({"run": run_dir.name, "state": state.state.value if state else None,
                           "identical": bool(got) and got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref),
                           "leftover_processes": not left, "faults": len(ledger) - before,
                           "training": summary.get("training_seconds", 0), "supervised": summary.get("supervised_seconds", 0)})
            print(f"round {number}: {rounds[-1]['state']}, {rounds[-1]['faults']} faults, "
                  f"identical={rounds[-1]['identical']} ({len(ledger)}/{args.faults})", flush=True)
    results = report(ledger, rounds, checkpoints, time.monotonic() - started, args, step_seconds)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "faults": ledger, "rounds": rounds}, indent=1))
    return 0 if results["passed"] else 1


def lost_bound(kind: str, every: int) -> int:
    """The most steps a fault may cost: one interval; two when the newest checkpoint itself was destroyed
    (the run falls back to the one before, at most `every` steps older)."""
    return 2 * every if kind == "corrupt_newest" else every


def report(ledger, rounds, checkpoints, seconds, args, step_seconds) -> dict:
    by_kind: dict[str, list] = {}
    for f in ledger:
        by_kind.setdefault(f["kind"], []).append(f)
    print(f"\n## Soak: {len(ledger)} faults in {len(rounds)} runs, {seconds / 60:.1f} min "
          f"(every_steps = {args.every}, {step_seconds * 1000:.0f} ms per step, seed {args.seed})\n")
    print("| fault | injected | recovered, right kind | work lost, steps (median / max) | seconds (median / max) |")
    print("| --- | --- | --- | --- | --- |")
    for kind in FAULTS:
        fs = by_kind.get(kind, [])
        if not fs:
            continue
        steps, secs = [f["lost_steps"] for f in fs], [f["lost_seconds"] for f in fs]
        print(f"| {kind} | {len(fs)} | {sum(f['ok'] for f in fs)} | {statistics.median(steps):g} / {max(steps)} | "
              f"{statistics.median(secs):.2f} / {max(secs):.2f} |")
    steps, secs = [f["lost_steps"] for f in ledger], [f["lost_seconds"] for f in ledger]
    training = sum(r["training"] for r in rounds)
    supervised = sum(r["supervised"] for r in rounds)
    results = {
        "faults": len(ledger), "recovered": sum(f["ok"] for f in ledger), "runs": len(rounds),
        "runs_succeeded": sum(r["state"] == "succeeded" for r in rounds),
        "runs_bit_identical": sum(r["identical"] for r in rounds),
        "runs_with_leftover_processes": sum(r["leftover_processes"] for r in rounds),
        "checkpoints_verified": len(checkpoints.seen), "checkpoints_unloadable": sum(not ok for ok in checkpoints.seen.values()),
        "lost_steps_median": statistics.median(steps) if steps else 0, "lost_steps_max": max(steps, default=0),
        "lost_seconds_median": round(statistics.median(secs), 2) if secs else 0,
        "lost_seconds_max": round(max(secs, default=0), 2),
        "goodput": round(training / supervised, 4) if supervised else None,
        "minutes": round(seconds / 60, 1), "step_seconds": round(step_seconds, 4),
    }
    results["damaged_checkpoints"] = sum("damaged" in f for f in ledger)
    results["damaged_set_aside"] = sum(bool(f.get("set_aside")) for f in ledger)
    results["over_the_promise"] = sum(f["lost_steps"] > lost_bound(f["kind"], args.every) for f in ledger)
    results["passed"] = (results["recovered"] == results["faults"] and results["runs_succeeded"] == results["runs"]
                         and results["runs_bit_identical"] == results["runs"]
                         and results["runs_with_leftover_processes"] == 0 and results["checkpoints_unloadable"] == 0
                         and results["over_the_promise"] == 0
                         and results["damaged_set_aside"] == results["damaged_checkpoints"])
    print(f"\n- all faults recovered with the right classification: {results['recovered']}/{results['faults']}")
    print(f"- runs succeeded: {results['runs_succeeded']}/{results['runs']}, bit-identical to the reference: "
          f"{results['runs_bit_identical']}/{results['runs']}, with processes left behind: "
          f"{results['runs_with_leftover_processes']}")
    print(f"- committed checkpoints verified and loaded: {results['checkpoints_verified']}, unloadable: "
          f"{results['checkpoints_unloadable']}")
    print(f"- work lost per fault: median {results['lost_steps_median']:g} steps / {results['lost_seconds_median']} s, "
          f"max {results['lost_steps_max']} steps / {results['lost_seconds_max']} s (promise: <= {args.every} steps, "
          f"<= {2 * args.every} after a corrupted newest checkpoint; over it: {results['over_the_promise']})")
    if results["damaged_checkpoints"]:
        print(f"- checkpoints the soak damaged, set aside in checkpoints/corrupt/: {results['damaged_set_aside']}/"
              f"{results['damaged_checkpoints']}")
    print(f"- goodput over all runs: {results['goodput']:.1%}" if results["goodput"] else "- goodput: n/a")
    print(f"- {'PASSED' if results['passed'] else 'FAILED'}")
    return results


if __name__ == "__main__":
    sys.exit(main())
