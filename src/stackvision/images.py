"""Decoding any image file into an 8-bit RGB PIL image, within limits.

Handles JPEG/PNG/WebP/BMP/GIF (first frame)/TIFF; greyscale, palette, CMYK, 16-bit and alpha become
RGB; EXIF orientation is applied; JPEGs much larger than needed are decoded in draft mode (DCT
scaling), which is several times faster than decoding at full size and then shrinking.

Every file is checked before the work it could make expensive, and any failure of one file is an
:class:`ImageDecodeError` (a listed bad image), never an exception that ends a run:

* the file type and size, before reading (:data:`DEFAULT_MAX_FILE_MB`, ``--max-image-mb`` or
  ``$STACKVISION_MAX_IMAGE_MB``);
* the aspect ratio, from the header (:data:`MAX_ASPECT`), before decoding;
* the pixel count that will be decoded (:data:`MAX_PIXELS`), after draft mode for a JPEG, so a
  large genuine photo is decoded at a reduced scale instead of refused.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .errors import StackvisionError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# A truncated JPEG must be an error we report, never a half-grey image we silently learn from.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Decompression-bomb protection stays on, but as an error rather than a warning.
warnings.simplefilter("error", Image.DecompressionBombWarning)

#: Largest image file read, in MiB. A JPEG, PNG or WebP at the pixel limit below is well under it
#: (a 90 MP JPEG at quality 95 is ~30-45 MB); only uncompressed TIFF/BMP files of that size exceed
#: it. Reading is what it bounds: every decode worker holds one file's bytes at a time.
DEFAULT_MAX_FILE_MB = 100.0
MAX_FILE_ENV = "STACKVISION_MAX_IMAGE_MB"

#: Most pixels decoded per image: Pillow's own decompression-bomb threshold (~268 MB as RGB). A
#: JPEG is checked after draft mode, i.e. at the reduced scale it is decoded at.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

#: Widest accepted aspect ratio (long side / short side). The networks see a centre crop of
#: ``crop_pct`` of the short side, so at 50:1 they see under 2% of the image, and resizing the
#: short side to the network's size makes the long side 50 times that (at most ~13 MB for a
#: 292 px resize); beyond it, the work grows with the ratio (a 1x2000 PNG of 90 bytes became a
#: 256x512000 image, 575 MB) for a crop that shows nothing of the picture. Real photographs,
#: panoramas included, stay under ~12:1.
MAX_ASPECT = 50

_JPEG_MAGIC = b"\xff\xd8\xff"
# The formats Pillow may open besides JPEG: the supported ones only. Pillow knows ~40 more (EPS
# would run Ghostscript, PSD, ICO, ...), each a parser an uploaded file could reach for nothing.
_OTHER_FORMATS = ("PNG", "WEBP", "BMP", "GIF", "TIFF")


class ImageDecodeError(Exception):
    """An image file that cannot be used, with a short human reason.

    ``too_large``: refused for its size (bytes or pixels) rather than for its content; the HTTP
    service answers 413 for these and 400 for the others.
    """

    def __init__(self, path: str, reason: str, too_large: bool = False):
        self.path = path
        self.reason = reason
        self.too_large = too_large
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # picklable across decode processes, flag included
        return type(self), (self.path, self.reason, self.too_large)


def is_image_file(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def max_file_bytes() -> int:
    """The file size limit in bytes: ``$STACKVISION_MAX_IMAGE_MB`` (set by ``--max-image-mb``),
    else :data:`DEFAULT_MAX_FILE_MB`. An environment variable, so decode processes see it too."""
    text = os.environ.get(MAX_FILE_ENV, "").strip()
    if not text:
        return int(DEFAULT_MAX_FILE_MB * 1024 * 1024)
    try:
        mb = float(text)
    except ValueError:
        mb = float("nan")
    if not mb > 0 or mb == float("inf"):
        raise StackvisionError(
            f"{MAX_FILE_ENV}={text!r} is not a positive number of MiB",
            f"set it to e.g. {DEFAULT_MAX_FILE_MB:g}, or unset it",
        )
    return int(mb * 1024 * 1024)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (or 32-bit) greyscale: scale the real range to 0..255 instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).astype(np.uint8)
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


def _open(data: bytes) -> Image.Image:
    """The image, header read, pixels not yet decoded. A JPEG is opened without Pillow's pixel
    check, which :func:`decode` makes itself after draft mode has reduced the scale."""
    if data.startswith(_JPEG_MAGIC):
        return JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    return Image.open(io.BytesIO(data), formats=_OTHER_FORMATS)


def check_shape(size: tuple[int, int], path: str) -> None:
    """Refuse an image with no pixels or an aspect ratio over :data:`MAX_ASPECT`."""
    w, h = size
    if w < 1 or h < 1:
        raise ImageDecodeError(path, f"image is {w}x{h} pixels: nothing to classify")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageDecodeError(
            path,
            f"aspect ratio of {w}x{h} is {max(w, h) / min(w, h):.0f}:1, over the limit of "
            f"{MAX_ASPECT}:1 (the network would see under {100 / MAX_ASPECT:.0f}% of it)",
        )


def _too_many_pixels(path: str, full, size, min_side: int | None) -> ImageDecodeError:
    w, h = size
    what = f"{full[0]}x{full[1]}"
    if min_side:
        what += f", {w}x{h} at the JPEG scale a {min_side} px resize needs,"
    return ImageDecodeError(
        path,
        f"too many pixels: {what} = {w * h}, over the limit of {MAX_PIXELS}",
        too_large=True,
    )


def probe(data: bytes, path: str = "<bytes>") -> tuple[str, int, int]:
    """(format, width, height) from the header, without decoding the pixels.

    Raises :class:`ImageDecodeError` for an unreadable header, and with ``too_large`` for an image
    so large that Pillow refuses to open it (over twice :data:`MAX_PIXELS`).
    """
    try:
        with _open(data) as img:
            return img.format or "?", int(img.size[0]), int(img.size[1])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"too many pixels ({exc})", too_large=True) from None
    except MemoryError:
        raise ImageDecodeError(path, "out of memory reading the image header") from None
    except Exception as exc:  # noqa: BLE001 - any header Pillow cannot read is a bad image
        raise ImageDecodeError(path, _reason(exc)) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (unknown format)"  # or one we do not parse (EPS, PSD, ...)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if "truncated" in reason.lower() or "broken data stream" in reason.lower():
        return f"truncated or corrupt image data ({reason})"
    if isinstance(exc, OSError | SyntaxError | ValueError):
        return reason
    # struct.error, IndexError, ZeroDivisionError, ...: a plug-in choking on malformed data
    return f"corrupt image data ({type(exc).__name__}: {reason})"


def decode(data: bytes, path: str = "<bytes>", min_side: int | None = None) -> Image.Image:
    """Decode image bytes into an RGB image.

    ``min_side``: the smallest side the caller will resize to; a JPEG larger than twice that is
    decoded at a reduced DCT scale that still keeps both sides >= ``min_side``.

    Any failure is an :class:`ImageDecodeError` with a reason, ``MemoryError`` included.
    """
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    try:
        img = _open(data)
        check_shape(img.size, path)
        if img.format == "JPEG":
            full = img.size
            if min_side:
                img.draft("RGB", (min_side, min_side))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise _too_many_pixels(path, full, img.size, min_side)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"too many pixels ({exc})", too_large=True) from None
    except MemoryError:
        raise ImageDecodeError(path, "out of memory while decoding it", too_large=True) from None
    except Exception as exc:  # noqa: BLE001 - one bad file is a listed problem, never a crash
        raise ImageDecodeError(path, _reason(exc)) from None


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


def _too_big(path: str, size: int, limit: int) -> ImageDecodeError:
    return ImageDecodeError(
        path,
        f"file is {_mib(size)}, over the limit of {_mib(limit)} (--max-image-mb); skipped",
        too_large=True,
    )


def read_bytes(path: str) -> bytes:
    """The bytes of an image file; anything but a regular file (a FIFO, ``/dev/zero`` behind a
    symlink, a directory) is refused before it is opened, since reading it could hang or never end,
    and so is a file over :func:`max_file_bytes` (a 30 GB sparse file is refused, not read)."""
    limit = max_file_bytes()
    try:
        st = os.stat(path)  # follows symlinks: what would be read
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(path, f"{_file_kind(st.st_mode)}, not a regular file; skipped")
        if st.st_size > limit:
            raise _too_big(path, st.st_size, limit)
        with open(path, "rb", buffering=0) as fh:
            # read what the stat promised, plus one byte to see growth: reading ``limit + 1`` at
            # once allocates the limit's worth for every file (38 vs 11 us a small JPEG here)
            data = fh.read(st.st_size + 1)
            if len(data) > st.st_size:  # it grew since the stat: the rest, up to the limit
                data += fh.read(limit + 1 - len(data))
        if len(data) > limit:
            raise _too_big(path, len(data), limit)
        return data
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory, not an image") from None
    except MemoryError:
        raise ImageDecodeError(path, "too large to read into memory", too_large=True) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ImageDecodeError(path, f"cannot read file ({reason})") from None


def load_rgb(path: str, min_side: int | None = None) -> Image.Image:
    """Read and decode one image file into RGB (see :func:`decode`)."""
    return decode(read_bytes(path), path, min_side)
