"""Issue 17, items 5-11: the supervisor's liveness, a stop during boot, a stopped worker, `start`'s verdict,
racing starts, a full disk, a damaged or deleted journal. Pure functions in process; a few real runs."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import psutil
from conftest import config_text, events, make_run, wait_for

from trainctl.contract.config import load
from trainctl.contract.lifecycle import Event
from trainctl.contract.protocol import ExitCode, Phase, read_heartbeat
from trainctl.supervisor import journal, runstate
from trainctl.supervisor.journal import Journal, read_events
from trainctl.supervisor.process import run_processes
from trainctl.supervisor.supervise import Supervisor


def start_supervisor(run_dir, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainctl.supervisor", "--run-dir", str(run_dir)],
                            env={**os.environ, "TRAINCTL_FAULTS": "", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trainctl(*args, env, cwd, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from trainctl.supervisor.cli import main; raise SystemExit(main())",
                           *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def cli_env(tmp_path, **extra) -> dict:
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "200", "TRAINCTL_FAULTS": "", **extra}


def exits(run_dir) -> list[tuple[str, int | None, str | None]]:
    return [(e["data"]["failure"], e["attempt"], e["data"]["signal"]) for e in events(run_dir, Event.EXIT)]


def training(run_dir, min_step: int = 0):
    hb = read_heartbeat(run_dir)
    return hb if hb and hb.phase is Phase.TRAINING and hb.step >= min_step else None


# ---- item 11: a damaged or deleted journal; attempt numbers that never reuse evidence ------------------
def test_a_garbage_journal_is_kept_aside_and_a_fresh_one_says_why(tmp_path):
    garbage = os.urandom(3000)
    (tmp_path / "journal.sqlite3").write_bytes(garbage)
    said = []
    j = Journal(tmp_path, said.append)
    j.record(Event.SUPERVISOR_START, pid=1)
    j.close()
    kept, = tmp_path.glob("journal.sqlite3.damaged-*")
    assert kept.read_bytes() == garbage                          # the damaged file is kept, untouched
    assert [e["kind"] for e in read_events(tmp_path)] == ["journal_reset", "supervisor_start"]
    reset = read_events(tmp_path)[0]["data"]
    assert "not a database" in reset["reason"] and reset["kept"] == str(kept)
    assert len(said) == 1 and kept.name in said[0]               # told once


def test_resume_check_of_a_garbage_journal_is_one_line_and_a_sound_one_is_left_alone(tmp_path):
    assert journal.check(tmp_path) is None                       # no journal yet: nothing to say
    (tmp_path / "journal.sqlite3").write_bytes(b"not a database at all" * 100)
    line = journal.check(tmp_path)
    assert line and "\n" not in line and "damaged" in line
    assert [e["kind"] for e in read_events(tmp_path)] == ["journal_reset"]
    assert journal.check(tmp_path) is None and len(list(tmp_path.glob("journal.sqlite3.damaged-*"))) == 1


def test_a_journal_deleted_while_written_is_noticed_and_started_afresh_with_our_events(tmp_path):
    said = []
    j = Journal(tmp_path, said.append)
    j.record(Event.SUPERVISOR_START, pid=1)
    j.record(Event.SPAWN, 1, 0, pid=2)
    for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)               # what `rm journal.sqlite3*` does to a running run
    j.record(Event.EXIT, 1, 0, 5, failure="killed")
    j.close()
    kinds = [e["kind"] for e in read_events(tmp_path)]
    assert kinds == ["supervisor_start", "spawn", "journal_reset", "exit"], kinds   # not an unlinked file's
    assert "deleted" in read_events(tmp_path)[2]["data"]["reason"] and len(said) == 1


def test_a_full_journal_costs_the_run_nothing_and_its_events_come_later(tmp_path):
    said, now = [], [0.0]
    j = Journal(tmp_path, said.append, clock=lambda: now[0])
    j.record(Event.SUPERVISOR_START, pid=1)
    j.db.execute("PRAGMA max_page_count = 1")                    # SQLite's own "database or disk is full"
    j.record(Event.SPAWN, 1, 0, note="x" * 20000)                # does not raise
    assert j.pending and "full" in said[0]
    now[0] += 60                                                 # the next retry (a fresh connection: no limit)
    assert j.flush() and [e["kind"] for e in read_events(tmp_path)] == ["supervisor_start", "spawn"]
    assert "writable again" in said[-1]
    j.close()


def test_the_next_attempt_follows_the_evidence_when_state_and_journal_are_gone(tmp_path, dataset):
    run_dir = make_run(tmp_path, "numbers", config_text("numbers", dataset))
    (run_dir / "evidence").mkdir()
    (run_dir / "evidence" / "attempt-003.fault.log").write_text("Fatal Python error: Segmentation fault")
    (run_dir / "evidence" / "attempt-002.error.json").write_text("{}")
    supervisor = Supervisor(run_dir, load(run_dir / "config.toml"), echo=lambda _m: None)
    assert supervisor.attempt == 3                               # the next one is 4: attempt-003.* is never overwritten
    (run_dir / "state.json").write_text(json.dumps({"state": "stopped", "attempt": 7}))
    assert Supervisor(run_dir, load(run_dir / "config.toml"), echo=lambda _m: None).attempt == 7


# ---- item 5: liveness does not rest on a file a person can delete ------------------------------------
def test_liveness_without_the_lock_needs_the_same_process_alive_and_its_run_not_ended(tmp_path):
    def alive_if(**recorded) -> bool:
        (tmp_path / "state.json").write_text(json.dumps({"state": "running", **recorded}))
        return runstate.supervisor_alive(tmp_path)
    started = runstate.own_start_time()
    assert alive_if(supervisor_pid=os.getpid(), supervisor_started=started)
    assert not alive_if(supervisor_pid=os.getpid(), supervisor_started=started - 100)   # a reused pid
    assert not alive_if(supervisor_pid=os.getpid(), supervisor_started=started, state="stopped")
    assert not alive_if(supervisor_pid=os.getpid())                                    # a 0.2 state.json
    assert not alive_if(supervisor_pid="1", supervisor_started="x")                    # nonsense is not a crash
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        zombie = psutil.Process(child.pid)
        wait_for(lambda: zombie.status() == psutil.STATUS_ZOMBIE, 30, what="a zombie")
        assert not alive_if(supervisor_pid=child.pid, supervisor_started=zombie.create_time())
    finally:
        child.wait()


def test_a_deleted_lock_file_does_not_make_a_live_supervisor_dead(tmp_path, dataset):
    """The lock file deleted mid-run: status still says running, resume is refused (not a second supervisor that
    kills the first one's worker), the supervisor takes a new lock, and stop works. The journal deleted too: a
    fresh one, and the worker, SIGSTOPped by someone, is continued by the stop: a stop, never a crash (item 8)."""
    env = cli_env(tmp_path)
    run_dir = make_run(tmp_path, "lockless", config_text("lockless", dataset, train={"epochs": 40},
                                                         supervisor={"stop_timeout_seconds": 60}))
    proc = start_supervisor(run_dir)
    try:
        hb = wait_for(lambda: training(run_dir, 2), 120, what="training")
        (run_dir / "supervisor.lock").unlink()
        assert runstate.supervisor_alive(run_dir)
        st = json.loads(trainctl("status", str(run_dir), "--json", env=env, cwd=tmp_path).stdout)
        assert st["state"] == "running" and st["supervisor_pid"] == proc.pid
        refused = trainctl("resume", str(run_dir), env=env, cwd=tmp_path)
        assert refused.returncode == ExitCode.RUNNING, refused.stdout + refused.stderr
        assert f"pid {proc.pid}" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        wait_for(lambda: (run_dir / "supervisor.lock").exists() and runstate.lock_held(run_dir), 30,
                 what="the supervisor to take a new lock file")
        for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"):
            (run_dir / name).unlink(missing_ok=True)
        os.kill(hb.pid, signal.SIGSTOP)                          # the worker stopped (Ctrl-Z, a debugger...)
        stop = trainctl("stop", str(run_dir), env=env, cwd=tmp_path)
        assert stop.returncode == ExitCode.OK, stop.stdout + stop.stderr
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.OK, out
    assert [e["data"]["pid"] for e in events(run_dir, Event.SPAWN)] == [hb.pid]   # never a second worker
    assert exits(run_dir) == [("stopped", 1, None)], out         # continued, checkpointed, exited: not SIGKILLed
    assert events(run_dir, Event.JOURNAL_RESET) and events(run_dir, Event.SUPERVISOR_START)   # ours, written again
    assert runstate.read_state(run_dir).state == "stopped" and "taken again" in out
    wait_for(lambda: not run_processes(run_dir), 30, what="no process of the run left")


# ---- item 7: a stop during boot is a stop ----------------------------------------------------------
def test_a_stop_during_boot_is_a_stop_twice_in_a_row(tmp_path, dataset):
    run_dir = make_run(tmp_path, "bootstop", config_text("bootstop", dataset))
    for attempt in (1, 2):
        proc = start_supervisor(run_dir)
        try:
            # the moment its worker is spawned: it is importing torch, its SIGTERM handler not yet installed
            wait_for(lambda: [e for e in events(run_dir, Event.SPAWN) if e["attempt"] == attempt], 60,
                     what=f"attempt {attempt} to spawn", interval=0.02)
            proc.send_signal(signal.SIGTERM)                     # what `trainctl stop` sends
            out, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == ExitCode.OK, out
        assert runstate.read_state(run_dir).state == "stopped", out
        wait_for(lambda: not run_processes(run_dir), 30, what="no process of the run left")
    assert [kind for kind, _, _ in exits(run_dir)] == ["stopped", "stopped"]
    assert not events(run_dir, Event.GIVE_UP)


# ---- item 9: start reports a worker that cannot even import torch -------------------------------------
def test_start_reports_the_error_line_of_a_worker_that_cannot_import_torch(tmp_path, dataset):
    broken = tmp_path / "broken-site" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this torch is broken on purpose')\n")
    env = cli_env(tmp_path, PYTHONPATH=os.pathsep.join(filter(None, [str(broken.parent),
                                                                     os.environ.get("PYTHONPATH")])))
    (tmp_path / "broken.toml").write_text(config_text("broken", dataset))
    result = trainctl("start", "--config", "broken.toml", env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.FAILED, result.stdout + result.stderr
    assert "started run" not in result.stdout
    assert "ImportError: this torch is broken on purpose" in result.stderr, result.stderr


# ---- item 10: two starts of one run at once: only the winner's config is frozen --------------------------
def test_two_racing_starts_one_wins_and_only_its_config_is_frozen(tmp_path, dataset):
    env = cli_env(tmp_path)
    for lr in ("0.001", "0.002"):
        (tmp_path / f"lr{lr}.toml").write_text(config_text("race", dataset, train={"epochs": 40, "lr": float(lr)}))
    starts = {lr: subprocess.Popen([sys.executable, "-c", "from trainctl.supervisor.cli import main; "
                                    "raise SystemExit(main())", "start", "--config", f"lr{lr}.toml"],
                                   env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for lr in ("0.001", "0.002")}
    results = {lr: (p.wait(timeout=240), *p.communicate()) for lr, p in starts.items()}
    run_dir = tmp_path / "runs" / "race"
    try:
        winners = [lr for lr, (rc, out, _) in results.items() if rc == ExitCode.OK and "started run race" in out]
        assert len(winners) == 1, results
        loser, = set(results) - set(winners)
        assert results[loser][0] == ExitCode.RUNNING and "already running" in results[loser][2], results[loser]
        assert load(run_dir / "config.toml").train.lr == float(winners[0])   # the winner's config, nobody else's
    finally:
        trainctl("stop", str(run_dir), env=env, cwd=tmp_path)
    wait_for(lambda: not run_processes(run_dir), 60, what="no process of the run left")


# ---- item 6: a full disk (here: a file size limit, which fails writes the same way without root) ----------
def no_room_to_write():
    """In the child: every write that grows a file fails (EFBIG, as ENOSPC would), instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


HEARTBEATS_WITHOUT_ROOM = """
import resource, signal, sys
from trainctl.worker.report import Reporter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
reporter = Reporter(sys.argv[1], 1, 0)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))     # the disk fills up
for step in range(3):
    reporter.beat(force=True, step=step)
    reporter.metric({"kind": "train", "step": step})
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
reporter.beat(force=True, step=3)
print("still training")
"""


def test_heartbeats_that_cannot_be_written_are_skipped_and_said_once(tmp_path):
    result = subprocess.run([sys.executable, "-c", HEARTBEATS_WITHOUT_ROOM, str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "still training" in result.stdout, result.stdout + result.stderr
    said = result.stdout.splitlines()
    assert len([line for line in said if "cannot write heartbeat.json" in line]) == 1, said
    assert "[trainctl] heartbeat.json is written again" in said
    assert read_heartbeat(tmp_path).step == 3


def test_resume_on_a_full_disk_is_one_line(tmp_path, dataset):
    run_dir = make_run(tmp_path, "full", config_text("full", dataset))
    (run_dir / "state.json").write_text(json.dumps({"state": "stopped", "attempt": 1}))
    result = subprocess.run([sys.executable, "-c", "from trainctl.supervisor.cli import main; raise SystemExit(main())",
                             "resume", str(run_dir)], env=cli_env(tmp_path), cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, preexec_fn=no_room_to_write)
    assert result.returncode == ExitCode.REFUSED, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no room to write" in result.stderr and "Fix: free some disk space" in result.stderr
