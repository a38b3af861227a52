"""A small synthetic ImageFolder (shapes on noisy backgrounds) that a tiny model learns in minutes,
and the config of a small run over it: what the demo, the tests and the benchmarks train."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainctl.contract import tomlout

CLASSES = ("circle", "square", "triangle", "stripes")
SMALL_RUN = {
    "run": {"runs_dir": "runs", "seed": 42},
    "model": {"name": "test_vit", "img_size": 32},       # a timm test model: a training step takes ~0.1 s
    "data": {"crop_scale": [0.5, 1.0]},
    "train": {"epochs": 3, "effective_batch_size": 16, "lr": 1e-3, "threads": 1},
    "checkpoint": {},
    "supervisor": {},
    "profiles": [{"device": "cpu", "batch_size": 8}],
}


def small_config(name: str, train_dir: Path | str, val_dir: Path | str | None = None, header: str = "",
                 **sections) -> str:
    """The TOML of a small CPU run named `name`. Each keyword names a section whose keys replace the
    base's (`SMALL_RUN`; a value of None removes the key); `profiles=[...]` replaces the ladder."""
    doc = {section: dict(keys) for section, keys in SMALL_RUN.items() if section != "profiles"}
    doc["run"]["name"] = name
    doc["data"].update(train_dir=str(train_dir), **({"val_dir": str(val_dir)} if val_dir else {}))
    for section, keys in sections.items():
        if section == "profiles":
            continue
        doc[section] = {k: v for k, v in {**doc.get(section, {}), **keys}.items() if v is not None}
    doc["profiles"] = [dict(p) for p in sections.get("profiles", SMALL_RUN["profiles"])]
    return (header + "\n" if header else "") + tomlout.dumps(doc)


def make_dataset(root: Path, per_class_train: int = 48, per_class_val: int = 12, size: int = 48,
                 seed: int = 0) -> tuple[Path, Path]:
    """Write root/train/<class>/*.jpg|png and root/val/<class>/*; return (train_dir, val_dir)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = draw(label, size, rng)
                if i % 4 == 3:
                    image.save(folder / f"{label}-{i:04d}.png")
                else:
                    image.save(folder / f"{label}-{i:04d}.jpg", quality=90)
    return root / "train", root / "val"


def draw(label: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `label`: a bright shape of random colour, size and place on a dark noisy field."""
    noise = rng.integers(0, 70, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(noise, "RGB")
    pen = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(140, 256, 3))
    extent = rng.uniform(0.45, 0.8) * size
    x0, y0 = rng.uniform(0, size - extent, 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    if label == "circle":
        pen.ellipse(box, fill=colour)
    elif label == "square":
        pen.rectangle(box, fill=colour)
    elif label == "triangle":
        pen.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    else:
        band = max(2, int(extent / 6))
        for y in range(int(y0), int(y0 + extent), 2 * band):
            pen.rectangle((x0, y, x0 + extent, min(y + band, y0 + extent)), fill=colour)
    return image
