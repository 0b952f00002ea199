"""Image sizes read from file headers, without decoding a pixel (pure Python; no OpenCV, no PIL).

`read_image` refuses an image above its pixel limit *before* decoding, so a small file that
declares 100000x100000 costs a few header bytes, not gigabytes. Formats: PNG (IHDR), JPEG (the
first SOF marker), BMP (DIB header), WebP (VP8, VP8L, VP8X), TIFF (first IFD, classic TIFF),
PNM (P1..P6). Anything else, or a header that is cut short, is `None`: the caller refuses it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["Header", "read_header", "FORMATS"]

FORMATS = ("PNG", "JPEG", "BMP", "WebP", "TIFF", "PNM")
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, 0xD8} | set(range(0xD0, 0xD8))
_MAX_JPEG_SEGMENTS = 4096  # a real JPEG reaches its SOF within a few dozen segments


@dataclass(frozen=True)
class Header:
    format: str
    width: int
    height: int
    bit_depth: int | None = None  # bits per sample where the header says it (PNG, JPEG, PNM)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(f: BinaryIO) -> Header | None:
    """The format and size declared by the header of the open binary file `f` (read from the
    start), or None when it is not one of FORMATS or the header is incomplete."""
    head = f.read(32)
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png(head)
        if head.startswith(b"\xff\xd8"):
            return _jpeg(f)
        if head.startswith(b"BM"):
            return _bmp(head)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head)
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff(f, head)
        if len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"123456":
            f.seek(0)
            return _pnm(f.read(1024))
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _png(head: bytes) -> Header | None:
    if head[12:16] != b"IHDR":
        return None
    w, h, depth = struct.unpack(">IIB", head[16:25])
    return Header("PNG", w, h, depth)


def _jpeg(f: BinaryIO) -> Header | None:
    f.seek(2)
    for _ in range(_MAX_JPEG_SEGMENTS):
        b = f.read(1)
        if b != b"\xff":
            return None
        while b == b"\xff":  # a marker, after any fill bytes
            b = f.read(1)
        if not b:
            return None
        marker = b[0]
        if marker in _JPEG_NO_LENGTH:
            continue
        raw = f.read(2)
        if len(raw) < 2:
            return None
        length = struct.unpack(">H", raw)[0]
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            depth, h, w = struct.unpack(">BHH", f.read(5))
            return Header("JPEG", w, h, depth) if h else None  # h 0: set later by DNL, refuse
        if marker == 0xDA:  # start of scan before any SOF: not a valid JPEG
            return None
        f.seek(length - 2, 1)
    return None


def _bmp(head: bytes) -> Header | None:
    dib = struct.unpack("<I", head[14:18])[0]
    if dib == 12:
        w, h = struct.unpack("<HH", head[18:22])
    elif dib >= 40:
        w, h = struct.unpack("<ii", head[18:26])
        h = abs(h)  # negative: rows stored top-down
    else:
        return None
    return Header("BMP", w, h) if w > 0 else None


def _webp(head: bytes) -> Header | None:
    kind = head[12:16]
    if kind == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
    elif kind == b"VP8L":
        if head[20] != 0x2F:
            return None
        bits = int.from_bytes(head[21:25], "little")
        w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif kind == b"VP8 ":
        if head[23:26] != b"\x9d\x01\x2a":
            return None
        w, h = struct.unpack("<HH", head[26:30])
        w, h = w & 0x3FFF, h & 0x3FFF
    else:
        return None
    return Header("WebP", w, h)


def _tiff(f: BinaryIO, head: bytes) -> Header | None:
    e = "<" if head[:2] == b"II" else ">"
    f.seek(struct.unpack(e + "I", head[4:8])[0])
    (n,) = struct.unpack(e + "H", f.read(2))
    size = {}
    for _ in range(n):
        tag, typ, count, value = struct.unpack(e + "HHI4s", f.read(12))
        if tag in (256, 257) and count == 1:
            if typ == 3:
                size[tag] = struct.unpack(e + "H", value[:2])[0]
            elif typ == 4:
                size[tag] = struct.unpack(e + "I", value)[0]
    if 256 not in size or 257 not in size:
        return None
    return Header("TIFF", size[256], size[257])


def _pnm(data: bytes) -> Header | None:
    """P1..P6: magic, width, height (and maxval except P1/P4), whitespace separated, # comments."""
    tokens: list[bytes] = []
    for line in data.split(b"\n"):
        tokens.extend(line.split(b"#", 1)[0].split())
        if len(tokens) >= 4:
            break
    want = 3 if tokens[0] in (b"P1", b"P4") else 4
    if len(tokens) < want or not all(t.isdigit() for t in tokens[1:want]):
        return None
    w, h = int(tokens[1]), int(tokens[2])
    depth = 1 if want == 3 else int(tokens[3]).bit_length()
    return Header("PNM", w, h, depth)
