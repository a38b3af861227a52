"""Hostile values and names (issue 17, items 12 and 14): every number finite and in range at `start`, run names
a person can type, hints that can be pasted into a shell, and a runs_dir that cannot be used: one line, no traceback."""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from conftest import config_text, make_run, wait_for

from trainctl.contract import config as c
from trainctl.contract import config_rules
from trainctl.contract.names import check_new_run, is_plain_name, shell_run
from trainctl.contract.protocol import ExitCode
from trainctl.supervisor import runstate

TABLES = {**c.SECTIONS, "profiles": c.Profile}


def numeric_keys() -> list[tuple[str, str, type, int]]:
    """(section, key, int or float, how many numbers: 1 for a scalar, 2 for a pair, 0 for a list) of the config."""
    keys = []
    for section, cls in TABLES.items():
        for key, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if hint in (int, float) or (args == [int] and typing.get_origin(hint) is not tuple):
                keys.append((section, key, int if int in (hint, *args) else float, 1))
            elif typing.get_origin(hint) is tuple and args and all(a in (int, float, Ellipsis) for a in args):
                keys.append((section, key, args[0], 0 if Ellipsis in args else len(args)))
    return keys


NUMERIC = numeric_keys()
# Not finite, negative, and huge-but-finite: each is refused for every numeric key of the config.
HOSTILE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "negative": -1, "huge": 1e300, "huge_int": 10**30}


def test_the_numeric_keys_are_found_and_each_has_a_range():
    found = {(section, key) for section, key, _, _ in NUMERIC}
    assert {("run", "seed"), ("train", "lr"), ("supervisor", "backoff_seconds"), ("data", "crop_scale"),
            ("profiles", "batch_size"), ("model", "img_size")} <= found
    assert found - config_rules.RANGES.keys() == set(), "add a range for each new numeric key to config_rules.RANGES"


def config_with(tmp_path: Path, dataset, section: str, key: str, value, count: int) -> Path:
    """The tests' config with `key` of `section` set to `value` (in every slot of a pair or list)."""
    value = [value] * (count or 1) if count != 1 else value
    if section == "profiles":
        text = config_text("hostile", dataset, profiles=[{"device": "cpu", "batch_size": 8, key: value}])
    else:
        text = config_text("hostile", dataset, **{section: {key: value}})
    path = tmp_path / "hostile.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("section,key,kind,count", NUMERIC, ids=[f"{s}.{k}" for s, k, _, _ in NUMERIC])
def test_every_hostile_number_of_every_key_is_one_line_naming_the_key(tmp_path, dataset, section, key, kind, count):
    label = "[[profiles]] #1" if section == "profiles" else f"[{section}]"
    for name, value in HOSTILE.items():
        with pytest.raises(c.ConfigError) as err:
            c.load(config_with(tmp_path, dataset, section, key, value, count))
        message = str(err.value)
        assert "\n" not in message and "Fix:" in message, (name, message)
        assert f"{label} {key}" in message or f"{label}.{key}" in message, (name, message)


@pytest.mark.parametrize("text,words", [
    ('memory_soft_limit = "1e999GB"', "not a finite number"),     # was: OverflowError
    ('memory_hard_limit = "1e30GB"', "more than any machine's memory"),
    ('memory_soft_limit = "nan%"', "between 0% and 100%"),
])
def test_a_memory_limit_too_large_for_any_number_is_refused(tmp_path, dataset, text, words):
    path = tmp_path / "limit.toml"
    path.write_text(config_text("limit", dataset).replace("[supervisor]\n", f"[supervisor]\n{text}\n", 1))
    with pytest.raises(c.ConfigError, match=words):
        c.load(path)


def test_a_huge_effective_batch_is_refused_at_once_and_divisors_are_found_fast():
    assert config_rules.divisors(10) == [1, 2, 5, 10] and config_rules.divisors(1) == [1]
    assert config_rules.divisors(49) == [1, 7, 49] and config_rules.divisors(0) == []
    assert len(config_rules.divisors(10**12)) == 169          # trial division to the square root: 10**6 steps


# ---- the real CLI ------------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path):
    """An isolated home for the run registry, a wide terminal, no faults."""
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "200", "TRAINCTL_FAULTS": ""}


CLI = "from trainctl.supervisor.cli import main; raise SystemExit(main())"


def trainctl(*args, env, cwd, prefix=(), timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-c", CLI, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """Exit `code`, one line on stderr with each of `words` ('[run] name' also matches '[run].name'), no traceback."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, result.stdout, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err or word.replace("] ", "].") in err, (word, err)


@pytest.mark.parametrize("section,text,words", [
    ("supervisor", "hang_timeout_seconds = nan", "[supervisor] hang_timeout_seconds = nan is not a finite number"),
    ("supervisor", "poll_seconds = nan", "[supervisor] poll_seconds"),
    ("supervisor", "log_max_mb = nan", "[supervisor] log_max_mb"),
    ("supervisor", "backoff_seconds = [inf]", "[supervisor] backoff_seconds = [inf]"),
    ("supervisor", 'memory_soft_limit = "1e999GB"', "[supervisor] memory_soft_limit"),
    ("run", "seed = -1", "[run] seed = -1 is out of range"),
    ("train", "effective_batch_size = 10000000001", "[train] effective_batch_size"),   # was: start hangs
])
def test_start_refuses_a_hostile_number_in_one_line_and_writes_nothing(tmp_path, dataset, env, section, text, words):
    key = text.split(" = ")[0]
    good = config_text("values", dataset)
    lines = [line for line in good.splitlines() if not line.startswith(f"{key} = ")]   # replace, or add
    bad = "\n".join(lines).replace(f"[{section}]", f"[{section}]\n{text}", 1)
    (tmp_path / "bad.toml").write_text(bad)
    result = trainctl("start", "--config", "bad.toml", env=env, cwd=tmp_path, timeout=60)
    assert_one_line(result, ExitCode.BAD_CONFIG, words, "Fix:")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "state").exists()   # nothing that blocks a start


def test_resume_config_refuses_a_hostile_number_in_one_line_and_changes_nothing(tmp_path, dataset, env):
    run_dir = make_run(tmp_path, "edited", config_text("edited", dataset))
    frozen = (run_dir / "config.toml").read_text()
    edited = config_text("edited", dataset).replace("poll_seconds = 0.1", "poll_seconds = nan")
    assert "poll_seconds = nan" in edited
    (tmp_path / "edited.toml").write_text(edited)
    result = trainctl("resume", "edited", "--config", "edited.toml", env=env, cwd=tmp_path, timeout=60)
    assert_one_line(result, ExitCode.BAD_CONFIG, "[supervisor] poll_seconds = nan is not a finite number", "Fix:")
    assert (run_dir / "config.toml").read_text() == frozen and not (run_dir / "state.json").exists()


@pytest.mark.parametrize("name,words", [
    ("-rf", "starts with '-'"),
    ("two\nlines", "contains '\\n'"),
    ("x$(touch PWNED)", "contains '$'"),
    ("a b", "contains ' '"),
    ("nul\0name", "NUL"),
    ("n" * 300, "is 300 characters long"),
])
def test_start_refuses_a_run_name_a_person_cannot_type(tmp_path, dataset, env, name, words):
    (tmp_path / "bad.toml").write_text(config_text(name, dataset))
    result = trainctl("start", "--config", "bad.toml", env=env, cwd=tmp_path, timeout=60)
    assert_one_line(result, ExitCode.BAD_CONFIG, "[run] name", words, "Fix:")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "PWNED").exists()


def test_a_service_install_of_a_new_run_refuses_such_a_name_too(tmp_path, dataset, env):
    (tmp_path / "bad.toml").write_text(config_text("-rf", dataset))
    result = trainctl("service", "install", "--config", "bad.toml", "--dry-run", env=env, cwd=tmp_path, timeout=60)
    assert_one_line(result, ExitCode.BAD_CONFIG, "[run] name = '-rf' starts with '-'", "Fix:")
    assert not (tmp_path / "runs").exists()


def without_root_override() -> tuple[str, ...]:
    """A command prefix under which permissions hold even for root (who may write into any folder)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: a read-only folder cannot be made")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")


@pytest.mark.parametrize("where", ["file", "under_a_file", "read_only", "nul"])
def test_a_runs_dir_that_cannot_be_used_is_one_line(tmp_path, dataset, env, where):
    blocked = tmp_path / "blocked"
    prefix: tuple[str, ...] = ()
    if where in ("file", "under_a_file"):
        blocked.write_text("a file where the runs should go")
        runs_dir, words = (blocked if where == "file" else blocked / "runs"), f"{blocked} is a file, not a folder"
    elif where == "read_only":
        blocked.mkdir()
        blocked.chmod(0o555)
        prefix, runs_dir, words = without_root_override(), blocked / "runs", f"{blocked} is not writable"
    else:
        runs_dir, words = "runs\0here", "NUL"
    (tmp_path / "run.toml").write_text(config_text("ok", dataset, run={"runs_dir": str(runs_dir)}))
    try:
        result = trainctl("start", "--config", "run.toml", env=env, cwd=tmp_path, prefix=prefix, timeout=60)
    finally:
        if blocked.is_dir():
            blocked.chmod(0o755)
    assert_one_line(result, ExitCode.BAD_CONFIG, "[run] runs_dir", words, "Fix:")
    assert not blocked.is_dir() or not any(blocked.iterdir())


# ---- hints a person pastes ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["-rf", "a b", "x$(touch PWNED)", "two\nlines", "it's", "plain-name_1.0"])
def test_a_hint_names_the_run_as_one_shell_word(tmp_path, name):
    run_dir = tmp_path / "my runs" / name
    word = shell_run(run_dir)
    assert shlex.split(word) == [name if is_plain_name(name) else str(run_dir)]
    assert not shlex.split(word)[0].startswith("-")


def test_names_the_rule_allows_and_refuses(tmp_path, dataset):
    for name, plain in [("vit-tiny.lr5e-4", True), ("Run_2", True), ("9", True), ("x" * 100, True),
                        ("x" * 101, False), (".hidden", False), ("_x", False), ("é", False), ("a/b", False), ("", False)]:
        assert is_plain_name(name) is plain, name
    path = tmp_path / "run.toml"
    path.write_text(config_text("a run", dataset))
    old = c.load(path)   # a name an older version allowed still loads (status, stop and resume find the run)
    with pytest.raises(c.ConfigError, match=r"\[run\] name = 'a run' contains ' '"):
        check_new_run(old)


def paste(hint: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """Run `hint` (a line trainctl printed) in bash, as a person who pastes it would: `trainctl` is this CLI."""
    define = f"trainctl() {{ {shlex.quote(sys.executable)} -c {shlex.quote(CLI)} \"$@\"; }}"
    return subprocess.run(["bash", "-c", f"{define}\n{hint}"], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def hint(output: str, label: str) -> str:
    """The command after `label` ('status:', 'Resume with:') in trainctl's output."""
    line = next(line for line in output.splitlines() if label in line)
    return line.split(label, 1)[1].strip().rstrip(".")


def test_an_old_run_with_a_hostile_name_resumes_and_its_printed_hints_work_when_pasted(tmp_path, dataset, env):
    """A run an older version let be named `-rf $(touch PWNED)`, in a runs_dir with a space: resume, status, logs
    and stop work, and every hint printed names it as one quoted shell word (pasting runs no command)."""
    name = "-rf $(touch PWNED)"
    text = config_text(name, dataset, run={"runs_dir": "my runs"}, train={"epochs": 40})
    run_dir = make_run(tmp_path, "old", text)
    assert run_dir == tmp_path / "my runs" / name
    resumed = trainctl("resume", str(run_dir), env=env, cwd=tmp_path)
    try:
        assert resumed.returncode == ExitCode.OK, resumed.stdout + resumed.stderr
        out = resumed.stdout
        assert hint(out, "folder:") == shlex.quote(str(run_dir))
        status = paste(hint(out, "status:") + " --json", env, tmp_path)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["state"] in ("starting", "running")
        wait_for(lambda: (run_dir / "heartbeat.json").exists(), 120, 0.2)
        stopped = paste(hint(out, "stop:"), env, tmp_path)
        assert stopped.returncode == 0 and "Traceback" not in stopped.stderr, stopped.stdout + stopped.stderr
        assert shlex.split(hint(stopped.stdout, "Resume with:")) == ["trainctl", "resume", str(run_dir)]
        logs = paste(hint(out, "logs:"), env, tmp_path)
        assert logs.returncode == 0 and logs.stdout, logs.stderr
    finally:
        stop_leftovers(run_dir)
    assert not (tmp_path / "PWNED").exists() and not (run_dir.parent / "PWNED").exists()


def stop_leftovers(run_dir: Path) -> None:
    """SIGKILL this run's supervisor and worker if a failed assertion left them running."""
    saved = runstate.read_state(run_dir)
    for pid in (getattr(saved, "supervisor_pid", None), getattr(saved, "worker_pid", None)):
        if pid and runstate.supervisor_alive(run_dir):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 30
    while runstate.supervisor_alive(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
