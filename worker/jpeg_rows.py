"""Let the JPEG decoder stop at the last row a crop needs.

Most of the cost of decoding a photo is the entropy (Huffman) decoding of the whole file, which
Pillow's reduced-scale ``draft()`` does not avoid (measured in bench/RESULTS.md). A sequential
JPEG coded as one interleaved scan stores its rows top to bottom, so the rows below a crop need
not be decoded at all: we hand the decoder a copy of the file whose frame header says the image
ends a margin below the crop, and the decoder stops there without reading the rest. Rows above
the crop must still be decoded (no random access without restart markers). Progressive,
multi-scan, arithmetic and lossless files are left whole, and so is a file with no end-of-image
marker after its scan: a truncated file must be reported as bad whichever crop an epoch draws.
"""
from __future__ import annotations

from dataclasses import dataclass

_SOF_SEQUENTIAL = (0xC0, 0xC1)                   # baseline, extended sequential (Huffman)
_SOF_OTHER = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOS = 0xDA
_EOI = b"\xff\xd9"


@dataclass(frozen=True)
class Frame:
    """Where a file's frame header keeps its height, and the rows in one MCU row."""
    height: int
    height_at: int   # byte offset of the 16-bit height
    mcu_rows: int    # 8 x the largest vertical sampling factor


def sequential_frame(data: bytes) -> Frame | None:
    """The frame of a complete sequential JPEG whose first scan holds every component, else None."""
    i, frame, components = 2, None, 0
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:   # fill byte before a marker
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF_OTHER:
            return None
        if marker in _SOF_SEQUENTIAL and i + 10 <= len(data):
            height, components = int.from_bytes(data[i + 5:i + 7], "big"), data[i + 9]
            vertical = [v & 0x0F for v in data[i + 11:i + 10 + 3 * components:3]]   # each component's factor
            if height == 0 or not vertical or len(vertical) != components or not all(1 <= v <= 4 for v in vertical):
                return None   # height 0: given later (DNL); the rest: malformed, left to the decoder
            frame = Frame(height, i + 5, 8 * max(vertical))
        if marker == _SOS:
            whole = frame is not None and i + 4 < len(data) and data[i + 4] == components
            return frame if whole and data.rfind(_EOI) > i else None
        i += 2 + length
    return None


def cut(data: bytes, frame: Frame, rows: int) -> bytes:
    """A copy of the file that declares only its top `rows` rows."""
    return b"".join((data[:frame.height_at], rows.to_bytes(2, "big"), data[frame.height_at + 2:]))
