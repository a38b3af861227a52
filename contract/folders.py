"""ImageFolder scanning and the epoch order. No torch: the CLI validates data folders with it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError


@dataclass(frozen=True)
class Folder:
    """A scanned ImageFolder: sorted class names and (path, label) samples sorted by path."""
    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


def scan(root: Path, extensions: tuple[str, ...], what: str = "[data] train_dir",
         classes: tuple[str, ...] | None = None) -> Folder:
    """Scan an ImageFolder of two or more classes; with `classes` given (validation), a subset of them."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{what} {root} does not exist or is not a folder. Fix: point it at a folder "
                          f"with one sub-folder of images per class.")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise ConfigError(f"{what} {root} has no class folders. Fix: put the images in one sub-folder "
                          f"per class, e.g. {root}/cat/1.jpg and {root}/dog/2.jpg.")
    if classes is not None:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ConfigError(f"{what} {root} has class folders the training set lacks: {unknown}. "
                              f"Fix: use the same class folder names as the training set.")
    elif len(found) < 2:   # one class trains to loss 0 and a model that always says that class
        raise ConfigError(f"{what} {root} has one class folder ({found[0]!r}); classification needs at least two. "
                          f"Fix: add a folder of images for each other class beside {root / found[0]}, or point "
                          f"{what} at the folder that holds the class folders.")
    else:
        classes = tuple(found)
    paths, labels = [], []
    for name in found:
        files = _images_under(root / name, extensions)
        if not files:
            raise ConfigError(f"{what}: class folder {root / name} has no images with extensions "
                              f"{' '.join(extensions)}. Fix: add images or remove the folder.")
        paths.extend(files)
        labels.extend([classes.index(name)] * len(files))
    return Folder(root, tuple(classes), tuple(paths), tuple(labels))


def _images_under(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions)
    return out


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of an epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x0DE]).permutation(n)


def step_files(cfg, epoch: int, cursor: int) -> list[str]:
    """The image files of the optimizer step that starts at (epoch, sample cursor) of run config `cfg`."""
    folder = scan(cfg.data.train_dir, cfg.data.extensions)
    order = epoch_order(cfg.run.seed, epoch, len(folder))
    return [folder.paths[int(i)] for i in order[cursor:cursor + cfg.train.effective_batch_size]]
