"""The identity of a run's training data: every file's path, class, size and modification time.

A run's checkpoints are only exact for the files they were trained on, in the order `folders.scan` gives
them. The checkpoint stores a fingerprint of the file list (`identity`); the list itself is written once
beside the checkpoints (DATA_MANIFEST_FILE, one JSON line per file), so that a refusal can name what changed.
With [data] val_split the list holds the training part of train_dir only, and the identity adds the split: its
fraction, and the count and a digest of the held-out paths (contract/split.py), so another split is refused.
Size + mtime, not a content hash: a stat per file costs about a second for 100k files, reading them all
would cost minutes at every boot. Standard library only (the supervisor may use it).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import fsio
from .config_rules import ConfigError
from .folders import Folder
from .names import shell_run
from .protocol import CannotContinue
from .runfolder import DATA_MANIFEST_FILE

SPLIT_KEYS = ("val_split", "val_held_out", "val_fingerprint")   # what [data] val_split held out (none: absent)
DATA_KEYS = ("classes", "num_samples", "data_fingerprint") + SPLIT_KEYS   # a checkpoint's identity about the data
SHOWN = 3   # files named per kind of change


@dataclass(frozen=True)
class Manifest:
    """The training files as (path relative to train_dir, class, size, mtime in ns), in scan order."""
    files: tuple[tuple[str, str, int, int], ...]
    fingerprint: str

    @property
    def classes(self) -> list[str]:
        return sorted({cls for _, cls, _, _ in self.files})


def build(folder: Folder) -> Manifest:
    """Stat every file of a scanned folder (a file gone since the scan counts with size and mtime -1)."""
    prefix = str(folder.root) + os.sep
    files = []
    for path, label in zip(folder.paths, folder.labels):
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = -1
        rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, folder.root)
        files.append((rel, folder.classes[label], size, mtime))
    return Manifest(tuple(files), fingerprint_of(files))


def fingerprint_of(files) -> str:
    text = "".join(f"{rel}\0{cls}\0{size}\0{mtime}\n" for rel, cls, size, mtime in files)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def identity(folder: Folder, manifest: Manifest) -> dict:
    """What a checkpoint stores about its data (DATA_KEYS; the split's keys only for a split folder, so that
    checkpoints of runs without one read as before)."""
    out = {"classes": list(folder.classes), "num_samples": len(folder), "data_fingerprint": manifest.fingerprint}
    if (held := folder.held_out) is not None:
        out.update(val_split=held.fraction, val_held_out=held.count, val_fingerprint=held.fingerprint)
    return out


def settings_only(identity_: dict) -> dict:
    """A checkpoint identity without its data keys (those are checked by `check`)."""
    return {k: v for k, v in identity_.items() if k not in DATA_KEYS}


# ---- the file beside the checkpoints -------------------------------------------------------------------
def write(run_dir: Path, manifest: Manifest, root: Path) -> None:
    """The file list, atomically: a header line, then one line per file."""
    header = {"fingerprint": manifest.fingerprint, "train_dir": str(root), "files": len(manifest.files),
              "columns": ["path", "class", "size", "mtime_ns"]}
    lines = [json.dumps(header)] + [json.dumps(list(f)) for f in manifest.files]
    fsio.atomic_write(Path(run_dir) / DATA_MANIFEST_FILE, "\n".join(lines) + "\n")


def stored_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint of the file list in the run folder (its first line only), or None."""
    try:
        with open(Path(run_dir) / DATA_MANIFEST_FILE, encoding="utf-8") as f:
            return json.loads(f.readline()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def read(run_dir: Path) -> Manifest | None:
    """The file list in the run folder, or None when it is missing or unreadable."""
    try:
        with open(Path(run_dir) / DATA_MANIFEST_FILE, encoding="utf-8") as f:
            header = json.loads(f.readline())
            files = tuple((str(r), str(c), int(s), int(m)) for r, c, s, m in map(json.loads, f))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return Manifest(files, header.get("fingerprint", ""))


def keep(run_dir: Path, manifest: Manifest, root: Path) -> str | None:
    """Write the file list unless the run folder already holds this one (the usual boot: one line read).

    A failed write does not stop training (a full disk is reported by the next checkpoint, which matters
    more); a later refusal then cannot name files. Returns what went wrong, or None."""
    if stored_fingerprint(run_dir) == manifest.fingerprint:
        return None
    try:
        write(run_dir, manifest, root)
    except OSError as e:
        return f"could not write {Path(run_dir) / DATA_MANIFEST_FILE} ({e.strerror or e}): a changed dataset " \
               f"will still be refused, but without naming the files"
    return None


# ---- what changed --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Changes:
    added: list[str]
    removed: list[str]
    relabelled: list[str]    # "cat/7.jpg → dog/7.jpg"
    modified: list[str]
    only_mtime: bool         # every modified file kept its size: a copy that did not keep times looks so

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.relabelled or self.modified)


def compare(before: Manifest, after: Manifest) -> Changes:
    """Files added, removed, moved to another class folder (same name and size), or changed in size or mtime."""
    old = {rel: (cls, size, mtime) for rel, cls, size, mtime in before.files}
    new = {rel: (cls, size, mtime) for rel, cls, size, mtime in after.files}
    modified = [rel for rel in new if rel in old and new[rel] != old[rel]]
    only_mtime = all(new[rel][1] == old[rel][1] for rel in modified)
    gone = [rel for rel in old if rel not in new]
    arrived = {}
    for rel in new:
        if rel not in old:
            arrived.setdefault((_within_class(rel), new[rel][1]), []).append(rel)
    removed, relabelled = [], []
    for rel in gone:
        twins = arrived.get((_within_class(rel), old[rel][1]))
        if twins:
            relabelled.append(f"{rel} → {twins.pop(0)}")
        else:
            removed.append(rel)
    added = [rel for group in arrived.values() for rel in group]
    return Changes(sorted(added), removed, relabelled, modified, only_mtime)


def _within_class(rel: str) -> str:
    return rel.split(os.sep, 1)[-1]


def describe(changes: Changes) -> str:
    """'2 added (a/1.jpg, a/2.jpg); 1 relabelled (a/3.jpg → b/3.jpg)': counts and the first few files."""
    parts = []
    for what, files in (("added", changes.added), ("removed", changes.removed),
                        ("relabelled (moved to another class folder)", changes.relabelled),
                        ("modified (size or modification time)", changes.modified)):
        if files:
            more = f", ... +{len(files) - SHOWN} more" if len(files) > SHOWN else ""
            parts.append(f"{len(files)} {what}: {', '.join(files[:SHOWN])}{more}")
    text = "; ".join(parts)
    if changes.modified and changes.only_mtime:
        text += (" (the modified files kept their sizes: a copy that did not keep modification times, "
                 "e.g. cp without -p, looks like this)")
    return text


def class_difference(before: list[str], after: list[str]) -> str:
    """'classes added: zebra; removed: circle' — the difference, not two lists cut to the same prefix."""
    added = [c for c in after if c not in before]
    removed = [c for c in before if c not in after]
    parts = ([f"classes added: {', '.join(added)}"] if added else []) + \
            ([f"classes removed: {', '.join(removed)}"] if removed else [])
    if not parts and list(before) != list(after):
        parts.append("the same classes in another order")
    return "; ".join(parts)


# ---- the check at boot ----------------------------------------------------------------------------------
def check(saved: dict, current: Manifest, folder: Folder, run_dir: Path) -> None:
    """Refuse (CannotContinue 'data_error') when the training files, or the files [data] val_split holds out, are
    not the ones checkpoint identity `saved` was made with (another val_split: ConfigError). Checkpoints from before
    file-level checks (no fingerprint) compare what they have."""
    run_dir = Path(run_dir)
    _check_fraction(saved, folder, run_dir)
    fingerprint = saved.get("data_fingerprint")
    if fingerprint == current.fingerprint:
        _check_held_out(saved, folder, run_dir)   # else the training files' refusal below names the files
        return
    listed = ""
    if fingerprint is None:
        what = _coarse_difference(saved, folder)
        if not what:
            return
        what += " (these checkpoints predate file-level data checks: only class names and the image count compare)"
    else:
        before = read(run_dir)
        if before is not None and before.fingerprint == fingerprint:
            what, listed = describe(compare(before, current)), f" (its file list: {run_dir / DATA_MANIFEST_FILE})"
        else:
            what = (_coarse_difference(saved, folder) or "the same classes and image count, other files") + \
                   f" ({run_dir / DATA_MANIFEST_FILE}, the list of the files they were made with, is missing)"
    if folder.held_out is not None:
        what += (" ([data] val_split holds out a share of each class: an image added or removed can move another "
                 "between training and validation)")
    name = shell_run(run_dir)
    raise CannotContinue("data_error", (
        f"the training data in {folder.root} is not what the checkpoints of run {run_dir.name} were trained on: "
        f"{what}. Resuming would not continue the same run. Fix: put the data back as it was{listed}, then: "
        f"trainctl resume {name}; or train on the new data as a new run (another [run] name)."))


def _check_fraction(saved: dict, folder: Folder, run_dir: Path) -> None:
    """Refuse (ConfigError) a [data] val_split other than the one checkpoint identity `saved` was made with."""
    then = saved.get("val_split", 0.0)   # checkpoints without the key were made without a split
    now = folder.held_out.fraction if folder.held_out is not None else 0.0
    if then != now:
        raise ConfigError(
            f"the checkpoints in {run_dir} were made with [data] val_split = {then:g}, now it is {now:g}: another "
            f"held-out validation set would also change the images the run trains on. Fix: restore val_split = "
            f"{then:g} in {run_dir / 'config.toml'}, then: trainctl resume {shell_run(run_dir)}; or start a new run "
            f"under another [run] name.")


def _check_held_out(saved: dict, folder: Folder, run_dir: Path) -> None:
    """Refuse (data_error) the same val_split holding out other files: images added to or removed from train_dir
    that changed the validation set only (with the training files' fingerprint unchanged)."""
    held = folder.held_out
    if held is None or saved.get("val_fingerprint") == held.fingerprint:
        return
    raise CannotContinue("data_error", (
        f"the files that [data] val_split = {held.fraction:g} holds out of {folder.root} are not those the checkpoints "
        f"of run {run_dir.name} were validated on ({saved.get('val_held_out')} images then, {held.count} now): images "
        f"were added to or removed from train_dir. Fix: put the data back as it was, then: trainctl resume "
        f"{shell_run(run_dir)}; or train on the new data as a new run (another [run] name)."))


def _coarse_difference(saved: dict, folder: Folder) -> str:
    parts = []
    classes = saved.get("classes")
    if classes is not None and list(classes) != list(folder.classes):
        parts.append(class_difference(list(classes), list(folder.classes)))
    count = saved.get("num_samples")
    if count is not None and count != len(folder):
        parts.append(f"{count} images then, {len(folder)} now")
    return "; ".join(parts)
