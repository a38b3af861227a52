"""What a worker does before it trains that need not be done again: the warm standby builds the model before it
is told GO, and the pre-training sanity check runs once per run and rung (its pass recorded in SANITY_FILE)."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from trainctl.contract import folders, fsio
from trainctl.contract.config import Config, load, to_toml
from trainctl.contract.runfolder import CONFIG_FILE, SANITY_FILE, read_json

from .model import build_model
from .tensorboard_log import summary_writer_class


# ---- the warm standby's head start --------------------------------------------------------------
# A standby worker waits, sometimes for hours, before it is told GO. What it can do before then must not depend
# on the rung (not known yet), the checkpoint (the running worker still writes new ones) or the data (it may change
# meanwhile; the scan after GO is what the checkpoint's manifest is checked against). The model qualifies: a resume
# builds it from the seed without weights and the checkpoint then replaces every one of them.

@dataclass(frozen=True)
class Prebuilt:
    """The model a standby built on the CPU before GO, for the config and class count it was built with."""
    cfg: Config
    num_classes: int
    model: torch.nn.Module

    def fits(self, cfg: Config, num_classes: int) -> bool:
        """Exactly what the boot would build now (same config, same number of classes)."""
        return cfg == self.cfg and num_classes == self.num_classes


def prebuild(run_dir: Path) -> Prebuilt | None:
    """A standby's work before GO: the run's model on the CPU, built as a resume builds it (seeded, no pretrained
    weights), and TensorBoard imported if the run logs to it. None if that fails: the boot after GO builds the model
    and reports the error then."""
    try:
        cfg = load(Path(run_dir) / CONFIG_FILE)
        classes = class_folders(cfg.data.train_dir)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # a training worker runs beside it: one core, not all of them
        try:
            torch.manual_seed(cfg.run.seed)   # as setup does before its build: even buffers outside the state agree
            model = build_model(cfg, classes, load_weights=False)
        finally:
            torch.set_num_threads(threads)   # what the boot would have had: the thread count can change float sums
        if cfg.logging.tensorboard:
            summary_writer_class()   # its import takes a second; open_board finds it loaded
    except Exception:   # noqa: BLE001 — the boot after GO does the same again and says what is wrong
        return None
    return Prebuilt(cfg, classes, model)


def class_folders(root: Path) -> int:
    """How many class folders `root` holds, by folders.scan's rule; setup checks it against the real scan."""
    return len(folders.class_names(root))


# ---- the sanity check: once per run and rung ------------------------------------------------------------

def sanity_key(cfg: Config, rung_index: int, device: torch.device) -> dict:
    """What a passed sanity check holds for: the rung, the whole config (a resume --config changes it), the device
    and the software that computed it."""
    return {"rung_index": rung_index, "config": hashlib.sha256(to_toml(cfg).encode()).hexdigest(),
            "device": str(device), "software": f"torch {torch.__version__}, timm {timm.__version__}"}


def passed_before(run_dir: Path, key: dict) -> dict | None:
    """The record (SANITY_FILE) of a sanity check that passed for `key` in this run, or None."""
    record = (read_json(Path(run_dir) / SANITY_FILE) or {}).get(str(key["rung_index"]))
    return record if isinstance(record, dict) and all(record.get(k) == v for k, v in key.items()) else None


def record_pass(run_dir: Path, key: dict, step: int) -> None:
    """Remember durably that the sanity check passed for `key` at `step`: one record per rung, the newest."""
    path = Path(run_dir) / SANITY_FILE
    records = read_json(path) or {}
    records[str(key["rung_index"])] = {**key, "step": step, "time": time.time()}
    fsio.atomic_write_json(path, records)
