"""Odd and hostile inputs built in memory: images with absurd headers, non-UTF-8 names."""

from __future__ import annotations

import io
import os
import struct
import zlib

from PIL import Image


def png_bytes(w: int, h: int, color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(w: int, h: int, color=(120, 80, 40), quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG header claiming ``w`` x ``h`` pixels, with a few bytes of pixel data: what an
    attacker sends to make a server allocate ``w * h * 3`` bytes."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def write_bytes_name(folder, raw_name: bytes, data: bytes) -> str:
    """Write ``data`` to a file whose name is the raw bytes ``raw_name`` (may be invalid UTF-8);
    returns the path as Python sees it (undecodable bytes as lone surrogates)."""
    path = os.path.join(os.fsencode(str(folder)), raw_name)
    with open(path, "wb") as fh:
        fh.write(data)
    return os.fsdecode(path)
