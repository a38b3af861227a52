"""The dependency rule, checked at runtime: supervisor → contract ← worker; the supervisor and the
contract never load torch, the worker never loads the supervisor. (A running supervisor process is
checked too: tests/test_supervisor_process.py looks at the libraries it has mapped.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNS_A_COMMAND = {"__main__", "command"}     # importing these runs the program


def loaded_after_importing(package: str) -> list[str]:
    """The modules in sys.modules of a fresh interpreter after importing every module of one of our packages."""
    modules = [f"trainctl.{package}.{p.stem}" for p in sorted((ROOT / package).glob("*.py"))
               if p.stem not in RUNS_A_COMMAND and p.stem != "__init__"]
    code = "import json, sys\n" + "".join(f"import {m}\n" for m in modules) + "print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def ours(modules: list[str]) -> set[str]:
    return {m.split(".")[1] for m in modules if m.startswith("trainctl.") and m.count(".") >= 1}


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in ("torch", "timm", "torchvision")]


@pytest.mark.parametrize("package,allowed", [("contract", {"contract"}), ("supervisor", {"supervisor", "contract"})])
def test_the_supervisor_and_the_contract_load_no_torch_and_nothing_of_the_worker(package, allowed):
    loaded = loaded_after_importing(package)
    assert heavy(loaded) == []
    assert ours(loaded) <= allowed, ours(loaded) - allowed


def test_the_worker_never_loads_the_supervisor():
    loaded = loaded_after_importing("worker")
    assert heavy(loaded), "the worker's modules did load: torch is among them"
    assert ours(loaded) <= {"worker", "contract"}, ours(loaded)
