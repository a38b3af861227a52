"""A checkpoint file's bytes on their way to the disk: copied into a page-aligned buffer, checksummed (CRC-32) while
the CPU cache still holds them, written with O_DIRECT where the filesystem takes it (checkpoint.save uses it)."""
from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
from typing import Callable

try:   # the same CRC-32 as zlib's, 5x faster (zlib 1.2/1.3 have no PCLMUL code): 0.1 s of CPU per GB, not 0.5 s
    from zlib_ng.zlib_ng import crc32
    CRC32_BY = "zlib-ng"
except ImportError:
    from zlib import crc32
    CRC32_BY = "zlib"


class Crc32:
    """A running CRC-32 with hashlib's names (update, hexdigest)."""


    def __init__(self):
        self.value = 0

    def update(self, b) -> None:
        self.value = crc32(b, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class ChecksumWriter(io.RawIOBase):
    """torch.save's output on its way into a file: copied into a page-aligned buffer and checksummed as it is
    copied (while the CPU cache still holds it), each full buffer written; `on_bytes` sees the running total
    (fault hook).

    Where the platform has O_DIRECT (Linux) the buffers go to the device without a copy into the page
    cache. That copy (page allocation, reclaim, dirty-page writeback) was most of the writer's CPU: 0.2–5 s
    of kernel time per GB on a 2-core VM, depending on the state of memory, against under 0.05 s with
    O_DIRECT; the whole write now takes about 0.25 s of CPU per GB with zlib-ng, 0.45 s with zlib, against
    1.9 s before (bench/checkpoint.py). Nor does it crowd the training images out of the page cache. The
    tail (under a block), and everything on a filesystem that refuses O_DIRECT (older tmpfs, some FUSE
    filesystems; macOS has no O_DIRECT), goes through the page cache, with writeback started every WRITEBACK_BYTES
    (Linux: posix_fadvise DONTNEED) so the final fsync has little left to wait for. Durability is unchanged:
    `fsio.atomic_writer` fsyncs the file, renames it and fsyncs the directory after this.
    """
    BUFFER_BYTES = 8 << 20       # per write: fewer wake-ups of the writer than 1 MiB (which measured about the same)
    CRC_BYTES = 1 << 20          # checksummed as soon as copied, while a core's L2 cache still holds them
    WRITEBACK_BYTES = 16 << 20   # page-cache writes only: 8–64 MiB all help about equally (--writeback-sweep)
    DIRECT = hasattr(os, "O_DIRECT")

    def __init__(self, f, on_bytes: Callable[[int], None]):
        f.flush()   # everything goes through the descriptor from here on
        self.fd, self.crc, self.size, self.on_bytes = f.fileno(), Crc32(), 0, on_bytes
        self.sent = self.written_back = self.filled = 0
        self.error: BaseException | None = None
        self._map = mmap.mmap(-1, self.BUFFER_BYTES)   # anonymous memory: page-aligned, as O_DIRECT needs
        self._buffer = memoryview(self._map)
        self.direct = False
        if self.DIRECT:
            self._set_direct(True)

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            data = memoryview(b).cast("B")
            done, room = 0, len(self._buffer)
            while done < len(data):
                take = min(len(data) - done, room - self.filled, self.CRC_BYTES)
                end = self.filled + take
                self._buffer[self.filled:end] = data[done:done + take]
                self.crc.update(self._buffer[self.filled:end])
                self.filled = end
                done += take
                if self.filled == room:
                    self._send(self._buffer)
                    self.filled = 0
            self.size += done
            self.on_bytes(self.size)
        except BaseException as e:
            # torch's zip writer turns this into a vague RuntimeError later; keep the real cause.
            self.error = self.error or e
            raise
        return done

    def finish(self) -> None:
        """Write what is left in the buffer; call once torch.save has returned."""
        self._set_direct(False)   # the tail is not a whole number of blocks
        self._send(self._buffer[:self.filled])
        self.filled = 0

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(BufferError):   # a traceback may still hold a slice: then the GC frees it
                self._buffer.release()
                self._map.close()
        super().close()

    def _send(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._set_direct(False)   # the filesystem took the flag but refuses the writes: the page cache
                if self.direct:
                    raise
                continue
            view = view[n:]
            self.sent += n
            if view:   # a short write leaves the next offset unaligned
                self._set_direct(False)
        if not self.direct and self.sent - self.written_back >= self.WRITEBACK_BYTES:
            self._start_writeback()

    def _set_direct(self, on: bool) -> None:
        """Switch O_DIRECT on or off for the file; `self.direct` says what holds."""
        if on == self.direct:
            return
        import fcntl
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
        except OSError:
            return
        self.direct = on

    def _start_writeback(self) -> None:
        if self.WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):   # not on macOS: F_FULLFSYNC at the end
            os.posix_fadvise(self.fd, self.written_back, self.sent - self.written_back, os.POSIX_FADV_DONTNEED)
        self.written_back = self.sent
