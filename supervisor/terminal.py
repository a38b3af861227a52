"""The terminal: one console for output, one for errors, shared by every command; and output that goes away.

A reader that goes away (a pipe closed by `| head`, a terminal hung up: a closed window, a dropped SSH
session) is not an error of the command: what can no longer be written is dropped (`GuardedStream`).
"""
from __future__ import annotations

import errno
import os

from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True)

# Write errors that mean the reader is gone for good (EIO: a hung-up terminal; ENXIO: a vanished tty device).
GONE = frozenset({errno.EPIPE, errno.EIO, errno.ENXIO})


def error(label: str, message: str) -> None:
    """One red label and a plain message on stderr (the message is data, never rich markup)."""
    err.print(f"[red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)


class GuardedStream:
    """A text stream that drops, instead of raising, what it can no longer write once its reader is gone.

    Then the descriptor under it is pointed at /dev/null (as Python's docs advise for EPIPE), so the
    text left in its buffer and the flush at exit go nowhere quietly: no BrokenPipeError traceback, no
    exit code 120. Another write error (a full disk under a redirect) drops that text only.
    """

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self.stream.write(text)
            except OSError as e:
                self._lost(e)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError as e:
                self._lost(e)

    def isatty(self) -> bool:
        return not self.gone and self.stream.isatty()

    def __getattr__(self, name):   # encoding, fileno, ...: the stream's own
        return getattr(self.stream, name)

    def _lost(self, error: OSError) -> None:
        if error.errno in GONE:
            self.gone = True
            silence(self.stream)


def silence(stream) -> None:
    """Point `stream`'s descriptor at /dev/null, and stderr's too when it is the same pipe or terminal."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):   # not a file: nothing under it to silence
        return
    targets = [fd]
    try:
        if fd != 2 and os.path.samestat(os.fstat(fd), os.fstat(2)):
            targets.append(2)
    except OSError:
        pass
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for target in targets:
            os.dup2(null, target)
    finally:
        os.close(null)


def guard(target: Console) -> GuardedStream:
    """Make `target` write through a `GuardedStream` (once); return that stream."""
    if not isinstance(target.file, GuardedStream):
        target.file = GuardedStream(target.file)
    return target.file
