"""Every whole config in the README (a TOML block with [run] and [train]) loads and passes every rule, with its
data folders pointed at a real dataset: a newcomer who copies one gets a run, not a ConfigError."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainctl.contract.config import load

README = Path(__file__).resolve().parent.parent / "README.md"
WHOLE = [b for b in re.findall(r"```toml\n(.*?)```", README.read_text(), re.S) if "[run]" in b and "[train]" in b]


def test_the_readme_has_whole_configs():
    assert len(WHOLE) >= 2   # the motivating case and the whole recipe


@pytest.mark.parametrize("text", WHOLE, ids=[re.search(r'name = "(.*?)"', b).group(1) for b in WHOLE])
def test_a_whole_config_of_the_readme_loads(tmp_path, dataset, text):
    train, val = dataset
    text = re.sub(r'train_dir = "[^"]*"', f'train_dir = "{train}"', text)
    path = tmp_path / "run.toml"
    path.write_text(re.sub(r'val_dir = "[^"]*"', f'val_dir = "{val}"', text))
    cfg = load(path)
    assert cfg.train.effective_batch_size % cfg.profiles[0].batch_size == 0 and cfg.data.train_dir == train
