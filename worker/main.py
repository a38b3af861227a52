"""Worker entry point: ``python -m trainctl.worker --run-dir DIR --rung N --attempt K``.

Turns every way of ending into the exit codes of `trainctl.contract.protocol`, with evidence:
faulthandler for native crashes, an error JSON for Python exceptions.
``python -m trainctl.worker --check-config FILE`` is the pre-flight `trainctl start` runs before a run
folder exists (`preflight.py`).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import os
import sys
import time
import traceback
from pathlib import Path

from trainctl.contract import fsio
from trainctl.contract.protocol import (ENV_SUPERVISOR_PID, ORPHAN_GRACE_SECONDS, WORKER_ENV, CannotContinue, ExitCode,
                                        Phase)
from trainctl.contract.runfolder import CONFIG_FILE, EVIDENCE_DIR, WORKER_LOCK, error_json_path, fault_log_path


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m trainctl.worker",
                                     description="trainctl training worker (normally started by the supervisor)")
    parser.add_argument("--run-dir", type=Path, help="the run folder (required unless --check-config)")
    parser.add_argument("--rung", type=int, default=1, help="rung of the ladder (1 = first)")
    parser.add_argument("--attempt", type=int, default=0, help="attempt number, names the evidence files")
    parser.add_argument("--standby", action="store_true",
                        help="import torch and timm and build the model, then wait for 'GO RUNG ATTEMPT' on stdin "
                             "(warm standby)")
    parser.add_argument("--check-config", type=Path, metavar="FILE",
                        help="check what only torch and timm can check in a config file, write nothing, exit")
    args = parser.parse_args(argv)
    if args.run_dir is None and args.check_config is None:
        parser.error("--run-dir is required")
    return args


def main(argv=None) -> int:
    timings = {"process_start": time.time()}
    args = parse_args(argv)
    if args.check_config is not None:
        from .preflight import check_config
        return check_config(args.check_config)
    run_dir = args.run_dir.resolve()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS; before CUDA starts
    for key, value in WORKER_ENV.items():   # when run by hand, not by the supervisor
        os.environ.setdefault(key, value)
    (run_dir / EVIDENCE_DIR).mkdir(parents=True, exist_ok=True)
    rank = int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None   # a group's (group.py)
    if not args.standby:
        faulthandler.enable(file=open(fault_log_path(run_dir, args.attempt, rank), "a"), all_threads=True)

    import filelock

    from trainctl.contract.config import ConfigError, load

    from .checkpoint import DiskFull
    from .device import is_oom
    from .dist import Group
    from .faults import Faults
    from .report import RankReporter, Reporter, say
    from .signals import Flags, watch_parent
    from .train import Trainer  # imports torch and timm: the slow part of booting
    timings["imported"] = time.time()

    prebuilt = None
    if args.standby:   # warm: the imports are done; a crash elsewhere makes this the next worker
        from .boot import prebuild
        prebuilt = prebuild(run_dir)   # the model too: after GO a resume only moves it and loads the checkpoint
        if prebuilt is not None:
            timings["prebuilt"] = time.time()
        line = sys.stdin.readline().split()
        if len(line) != 3 or line[0] != "GO":
            return 0   # the supervisor went away or let the standby go
        args.rung, args.attempt = int(line[1]), int(line[2])
        timings["go"] = time.time()
        faulthandler.enable(file=open(fault_log_path(run_dir, args.attempt), "a"), all_threads=True)
    rung_index = args.rung - 1
    group = Group.from_env()
    reporter = (Reporter if group.main else RankReporter)(run_dir, args.attempt, rung_index)
    reporter.beat(Phase.BOOTING, force=True, timings=timings)   # the first heartbeat: "the worker came up"
    flags = Flags()
    flags.install()
    if os.environ.get(ENV_SUPERVISOR_PID):
        watch_parent(int(os.environ[ENV_SUPERVISOR_PID]), flags)
    faults = Faults(run_dir, rung_index, group.rank)
    faults.hit("boot")
    # Rank 0 holds it for a group: the others load only the checkpoint it chooses (setup.load_checkpoint).
    lock = filelock.FileLock(run_dir / WORKER_LOCK) if group.main else contextlib.nullcontext()
    try:   # an orphaned worker of a dead supervisor may still be checkpointing: give it time
        lock.acquire(timeout=ORPHAN_GRACE_SECONDS + 15) if group.main else None
    except filelock.Timeout:
        say(f"another worker holds {run_dir / WORKER_LOCK}: not starting a second one on this run")
        return ExitCode.LOCKED
    trainer = None
    try:
        cfg = load(run_dir / CONFIG_FILE)
        if not 0 <= rung_index < len(cfg.profiles):
            raise ConfigError(f"--rung {args.rung} is not a rung of the ladder (1..{len(cfg.profiles)})")
        trainer = Trainer(cfg, run_dir, rung_index, flags, reporter, faults, prebuilt, group)
        prebuilt = None   # the trainer holds it now, and lets it go once built (an unused model is not kept)
        trainer.setup()
        if trainer.progress.epoch < cfg.train.epochs:
            trainer.start_loading()   # its processes start while the sanity check runs
            trainer.sanity_check()
        return trainer.fit()
    except ConfigError as e:
        return report_error(run_dir, args.attempt, "config_error", e, ExitCode.CONFIG_ERROR, trainer, rank)
    except DiskFull as e:
        return report_error(run_dir, args.attempt, "disk_full", e, ExitCode.DISK_FULL, trainer, rank)
    except CannotContinue as e:
        return report_error(run_dir, args.attempt, e.kind, e, ExitCode.CANNOT_CONTINUE, trainer, rank)
    except BaseException as e:   # noqa: BLE001 — every exception must leave evidence
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):   # the disk filled up under us
            return report_error(run_dir, args.attempt, "disk_full", e, ExitCode.DISK_FULL, trainer, rank)
        if is_oom(e):
            checkpoint_at_failure(trainer, "out of memory", e)
            return report_error(run_dir, args.attempt, "oom", e, ExitCode.OUT_OF_MEMORY, trainer, rank)
        if isinstance(e, Exception):
            checkpoint_at_failure(trainer, "exception", e)
        return report_error(run_dir, args.attempt, "exception", e, ExitCode.INTERNAL_ERROR, trainer, rank)
    finally:
        if trainer is not None:
            trainer.stop_loading()
        if getattr(trainer, "ckpt", None) is not None:
            trainer.ckpt.writer.drain()
        if getattr(trainer, "board", None) is not None:
            trainer.board.close()   # its last events, before __main__ leaves by os._exit
        if group.main:
            lock.release()
        timings["returned"] = time.time()
        reporter.beat(force=True)


def checkpoint_at_failure(trainer, what: str, exc: BaseException) -> None:
    """Before exiting on a caught failure: write the last completed optimizer step (Trainer.checkpoint_at_failure).
    Its own failure is said and goes no further: the original error decides how the worker exits."""
    if getattr(trainer, "ckpt", None) is None:
        return   # it failed before training began: the newest checkpoint is where it stands
    if not trainer.cfg.checkpoint.at_failure:
        return   # [checkpoint] at_failure = false: the newest scheduled checkpoint is where the next attempt starts
    traceback.clear_frames(exc.__traceback__)   # the failed step's activations and graph, held by its frames
    try:
        trainer.checkpoint_at_failure(what)
    except BaseException as e:   # noqa: BLE001 — never hides the original error
        print(f"[trainctl] the checkpoint at failure could not be written ({type(e).__name__}: {e}); the newest "
              f"checkpoint, step {trainer.ckpt.committed_step}, is kept; exiting on the original error",
              file=sys.stderr, flush=True)


def report_error(run_dir: Path, attempt: int, kind: str, exc: BaseException, code: int, trainer,
                 rank: int | None = None) -> int:
    """Write the error JSON the supervisor classifies, print one clear line, return the exit code. A rank of a
    group writes its own (`rank`), saying whether the error only says that a peer went away (`collective`)."""
    progress = getattr(trainer, "progress", None)
    record = {"kind": kind, "type": type(exc).__name__, "message": str(exc), "exit_code": code,
              "traceback": traceback.format_exc(), "time": time.time(),
              "step": progress.step if progress else None,
              "epoch": progress.epoch if progress else None,
              "cursor": progress.cursor if progress else None}
    if rank is not None:
        from .dist import broken_collective
        record.update(rank=rank, collective=broken_collective(exc))
    path = error_json_path(run_dir, attempt, rank)
    try:
        fsio.atomic_write_json(path, record)
    except OSError as e:   # a full disk: the exit code and the line below still say it
        print(f"[trainctl] could not write {path.name}: {e}", file=sys.stderr, flush=True)
    print(f"[trainctl] {kind}{'' if rank is None else f' (rank {rank})'}: {exc}", file=sys.stderr, flush=True)
    if kind == "exception":
        traceback.print_exc()
    return code
