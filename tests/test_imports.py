"""The supervisor stays small: it never imports torch, and takes only the worker's contract modules."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = {"protocol", "config", "tomlout", "folders", "fsio"}


def test_supervisor_modules_never_import_torch():
    modules = [f"trainctl.supervisor.{p.stem}" for p in (ROOT / "supervisor").glob("*.py")
               if p.stem not in ("__main__", "command")]   # these two run a command when imported
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_supervisor_takes_only_the_contract_modules_from_the_worker():
    used = set()
    for path in (ROOT / "supervisor").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainctl.worker"):
                parts = node.module.split(".")
                used |= {parts[2]} if len(parts) > 2 else {alias.name for alias in node.names}
    assert used <= CONTRACT, used - CONTRACT


def test_worker_never_imports_the_supervisor():
    for path in (ROOT / "worker").glob("*.py"):
        assert "trainctl.supervisor" not in path.read_text(), path.name
