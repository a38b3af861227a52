"""Keep the machine awake while a run trains: caffeinate on macOS, systemd-inhibit on Linux.

The helper process is tied to the supervisor's pid (``caffeinate -w PID``; ``tail --pid=PID``
under systemd-inhibit), so the assertion is released when the run ends *and* when the supervisor
dies, however it dies.
"""
from __future__ import annotations

import shutil
import subprocess
import sys


def command(run_name: str, pid: int) -> list[str] | None:
    """The sleep-inhibitor command for this platform, or None when there is none."""
    if sys.platform == "darwin" and shutil.which("caffeinate"):
        return ["caffeinate", "-i", "-s", "-w", str(pid)]   # no idle sleep, no system sleep on AC power
    if sys.platform.startswith("linux") and shutil.which("systemd-inhibit"):
        return ["systemd-inhibit", "--what=sleep:idle", "--who=trainctl", f"--why=training run {run_name}",
                "--mode=block", "tail", f"--pid={pid}", "-f", "/dev/null"]
    return None


class KeepAwake:
    def __init__(self, run_name: str, pid: int, echo):
        self.run_name, self.pid, self.echo = run_name, pid, echo
        self.proc: subprocess.Popen | None = None
        self._reported = False

    def start(self) -> None:
        cmd = command(self.run_name, self.pid)
        if cmd is None:
            self.echo("keep-awake: no caffeinate or systemd-inhibit here; the machine may sleep during training")
            return
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            self.echo(f"keep-awake: could not start {cmd[0]}: {e}")

    def check(self) -> None:
        """Report once if the inhibitor died (e.g. no logind on this machine)."""
        if self.proc is not None and not self._reported and self.proc.poll() is not None:
            self._reported = True
            why = (self.proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()
            self.echo(f"keep-awake: {self.proc.args[0]} exited ({why[-1] if why else self.proc.returncode}); "
                      f"the machine may sleep during training")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
