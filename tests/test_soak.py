"""A short soak (`pytest -m soak`, a few minutes): the long one is `python bench/soak.py --faults 200`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_a_short_soak_passes_every_check(tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--faults", "20", "--per-round", "7",
                             "--dir", str(tmp_path / "soak"), "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results["faults"] >= 20 and results["recovered"] == results["faults"]
    assert results["runs_bit_identical"] == results["runs"] and results["checkpoints_unloadable"] == 0
