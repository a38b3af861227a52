"""sd_notify over $NOTIFY_SOCKET: a few lines of standard library instead of a dependency.

READY=1 once the first worker passed its sanity check, STATUS= lines, STOPPING=1, and WATCHDOG=1
only while the run makes progress (the verdict is `watch.assess`'s), so systemd also restarts a
supervisor that is alive but whose run is stuck.
"""
from __future__ import annotations

import os
import socket


class Notifier:
    """Sends datagrams to the service manager; does nothing when not run under systemd."""

    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        # "@name" is a Linux abstract socket: the name starts with a NUL byte.
        self.address = ("\0" + address[1:]) if address.startswith("@") else address
        self.ready_sent = False
        self._last_status = ""

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            pass   # the manager went away; supervision must not depend on it

    def ready(self, status: str) -> None:
        if not self.ready_sent:
            self.ready_sent = True
            self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")
