"""Decoding any image file into an 8-bit RGB PIL image.

Handles JPEG/PNG/WebP/BMP/GIF (first frame)/TIFF; greyscale, palette, CMYK, 16-bit and alpha become
RGB; EXIF orientation is applied; JPEGs much larger than needed are decoded in draft mode (DCT
scaling), which is several times faster than decoding at full size and then shrinking.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# A truncated JPEG must be an error we report, never a half-grey image we silently learn from.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Decompression-bomb protection stays on, but as an error rather than a warning.
warnings.simplefilter("error", Image.DecompressionBombWarning)


class ImageDecodeError(Exception):
    """An image file that cannot be used, with a short human reason."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (or 32-bit) greyscale: scale the real range to 0..255 instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite onto white: transparent backgrounds of product/leaf photos are white in practice.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes, path: str = "<bytes>", min_side: int | None = None) -> Image.Image:
    """Decode image bytes into an RGB image.

    ``min_side``: the smallest side the caller will resize to; a JPEG larger than twice that is
    decoded at a reduced DCT scale that still keeps both sides >= ``min_side``.
    """
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and min_side:
            img.draft("RGB", (min_side, min_side))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image file (unknown format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, f"too many pixels ({exc})") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageDecodeError(path, f"too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower() or "broken data stream" in reason.lower():
            reason = f"truncated or corrupt image data ({reason})"
        raise ImageDecodeError(path, reason) from None


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: str) -> bytes:
    """The bytes of an image file; anything but a regular file (a FIFO, ``/dev/zero`` behind a
    symlink, a directory) is refused before it is opened, since reading it could hang or never end."""
    try:
        st = os.stat(path)  # follows symlinks: what would be read
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(path, f"{_file_kind(st.st_mode)}, not a regular file; skipped")
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory, not an image") from None
    except MemoryError:
        raise ImageDecodeError(path, "too large to read into memory") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file ({exc.strerror or exc})") from None


def load_rgb(path: str, min_side: int | None = None) -> Image.Image:
    """Read and decode one image file into RGB (see :func:`decode`)."""
    return decode(read_bytes(path), path, min_side)
