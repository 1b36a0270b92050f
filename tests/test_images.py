"""Decoding: every format and pixel mode the issue names becomes RGB uint8; bad files are reported."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stackvision.images import ImageDecodeError, decode, load_rgb
from stackvision.preprocess import Preprocess

from .conftest import WOOF, synthetic_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_formats_decode_to_rgb(fmt):
    img = decode(_encode(synthetic_image((40, 30)), fmt), f"x.{fmt.lower()}")
    assert img.mode == "RGB" and img.size == (40, 30)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "1"])
def test_pixel_modes_become_rgb(mode):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    img = decode(_encode(synthetic_image((20, 10), mode=mode), fmt))
    assert img.mode == "RGB" and img.size == (20, 10)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.linspace(0, 65535, 64 * 8, dtype=np.uint16).reshape(8, 64)
    img = decode(_encode(Image.fromarray(arr), "PNG"))
    out = np.asarray(img)
    assert img.mode == "RGB"
    assert out.min() == 0 and out.max() == 255
    assert 100 < out[:, 32].mean() < 155  # the middle of the range stays in the middle


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(decode(_encode(rgba, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    px = np.asarray(decode(buf.getvalue()))[0, 0]
    assert px[0] > 200 and px[2] < 50


def test_exif_orientation_is_applied():
    img = synthetic_image((60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 60)


def test_draft_mode_shrinks_large_jpegs_but_keeps_enough_pixels():
    big = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)
    )
    data = _encode(big, "JPEG")
    full = decode(data)
    small = decode(data, min_side=256)
    assert full.size == (2000, 1500)
    assert small.size[0] < 2000 and min(small.size) >= 256


def test_draft_mode_gives_nearly_the_same_preprocessed_pixels():
    path = sorted((WOOF / "val" / "n02099601").iterdir())[0]
    pp = Preprocess(input_size=64, crop_pct=1.0)
    a = pp.to_uint8(load_rgb(str(path))).astype(int)
    b = pp.to_uint8(load_rgb(str(path), min_side=pp.resize_size)).astype(int)
    assert np.abs(a - b).mean() < 4


def test_bad_files_have_reasons(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(_encode(synthetic_image((300, 300)), "JPEG")[:2000])
    reasons = {}
    for p in (empty, text, trunc, tmp_path / "missing.jpg"):
        with pytest.raises(ImageDecodeError) as exc:
            load_rgb(str(p))
        reasons[p.name] = exc.value.reason
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    assert "truncated" in reasons["trunc.jpg"]
    assert "not found" in reasons["missing.jpg"]


# ---------------------------------------------------------------------- limits (issue 11)
@pytest.mark.parametrize("size", [(1, 2000), (80000, 1), (51, 1), (1, 51)])
def test_absurd_aspect_ratios_are_refused_from_the_header(size):
    from .hostile_inputs import png_header_only

    with pytest.raises(ImageDecodeError, match=r"aspect ratio .* over the limit of 50:1"):
        decode(png_header_only(*size), min_side=256)


def test_aspect_ratio_at_the_limit_is_decoded_and_cheap():
    from .hostile_inputs import png_bytes

    pp = Preprocess(input_size=260, crop_pct=0.89)
    img = decode(png_bytes(6, 300), min_side=pp.resize_size)
    assert pp.to_uint8(img).shape == (260, 260, 3)


@pytest.fixture()
def small_pixel_limit(monkeypatch):
    """Pillow's and our pixel limits at 1 MP, so a 3 MP image stands for a > 90 MP photo."""
    import stackvision.images as images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    monkeypatch.setattr(images, "MAX_PIXELS", 1_000_000)


def test_large_jpeg_is_decoded_in_draft_mode_instead_of_refused(small_pixel_limit):
    from .hostile_inputs import jpeg_bytes, png_bytes

    data = jpeg_bytes(2000, 1500)  # 3 MP: over the (patched) limit at full scale
    img = decode(data, min_side=256)  # 1/4 scale: 500x375
    assert img.size == (500, 375)
    with pytest.raises(ImageDecodeError) as exc:
        decode(data)  # no size asked for: full scale, refused
    assert exc.value.too_large and "too many pixels: 2000x1500" in exc.value.reason
    with pytest.raises(ImageDecodeError) as exc:
        decode(data, min_side=1400)  # even the largest useful draft scale is over it
    assert exc.value.too_large and "2000x1500, 2000x1500 at the JPEG scale a 1400 px" in str(
        exc.value
    )
    with pytest.raises(ImageDecodeError) as exc:
        decode(png_bytes(2000, 1500), min_side=256)  # no draft mode outside JPEG
    assert exc.value.too_large and "too many pixels" in exc.value.reason


def test_probe_reads_the_header_even_of_a_bomb():
    from stackvision.images import probe

    from .hostile_inputs import jpeg_bytes, png_header_only

    assert probe(jpeg_bytes(30, 20)) == ("JPEG", 30, 20)
    with pytest.raises(ImageDecodeError) as exc:
        probe(png_header_only(20000, 10000))  # 200 MP: Pillow will not even open it
    assert exc.value.too_large
    with pytest.raises(ImageDecodeError) as exc:
        probe(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert not exc.value.too_large


def test_any_decoder_exception_is_an_image_decode_error(monkeypatch):
    from PIL import PngImagePlugin

    def broken(self):
        raise IndexError("list index out of range")  # what a plug-in choking on bytes raises

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    with pytest.raises(ImageDecodeError, match="corrupt image data \\(IndexError"):
        decode(_encode(synthetic_image((8, 8)), "PNG"))


def test_file_size_limit_is_checked_before_reading(tmp_path, monkeypatch):
    from stackvision.errors import StackvisionError
    from stackvision.images import read_bytes

    p = tmp_path / "big.jpg"
    p.write_bytes(b"\xff" * 3 * 1024 * 1024)
    monkeypatch.setenv("STACKVISION_MAX_IMAGE_MB", "2")
    with pytest.raises(ImageDecodeError) as exc:
        read_bytes(str(p))
    assert exc.value.too_large and "3.0 MiB, over the limit of 2.0 MiB" in exc.value.reason
    monkeypatch.setenv("STACKVISION_MAX_IMAGE_MB", "4")
    assert len(read_bytes(str(p))) == 3 * 1024 * 1024
    monkeypatch.setenv("STACKVISION_MAX_IMAGE_MB", "lots")
    with pytest.raises(StackvisionError, match="STACKVISION_MAX_IMAGE_MB"):
        read_bytes(str(p))


def test_a_file_that_grew_after_its_stat_is_read_whole_up_to_the_limit(tmp_path, monkeypatch):
    """read_bytes reads the stat's size plus one byte; more bytes than the stat said (the file
    grew in between) are read on, and still refused over the limit."""
    import os

    import stackvision.images as images

    monkeypatch.delenv("STACKVISION_MAX_IMAGE_MB", raising=False)  # the default limit
    p = tmp_path / "growing.jpg"
    p.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    real_stat = os.stat

    def stale_stat(path, *a, **kw):  # the size it had before it grew
        st = real_stat(path, *a, **kw)
        return os.stat_result((st.st_mode, *st[1:6], 1000, *st[7:]))

    monkeypatch.setattr(images.os, "stat", stale_stat)
    assert images.read_bytes(str(p)) == p.read_bytes()
    monkeypatch.setenv("STACKVISION_MAX_IMAGE_MB", "1")
    with pytest.raises(ImageDecodeError) as exc:
        images.read_bytes(str(p))
    assert exc.value.too_large and "over the limit of 1.0 MiB" in exc.value.reason


def test_decode_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ImageDecodeError("a.jpg", "too big", too_large=True)))
    assert (err.path, err.reason, err.too_large) == ("a.jpg", "too big", True)


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "PPM", "EPS"])
def test_formats_outside_the_supported_ones_are_not_parsed(fmt):
    img = synthetic_image((16, 16))
    with pytest.raises(ImageDecodeError, match=r"not an image file \(unknown format\)"):
        decode(_encode(img, fmt))
