"""One normalisation (numpy and torch agree, BGR handled) and one decode-and-crop."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from stackvision.preprocess import Preprocess, mean_std_255, normalize

from .conftest import synthetic_image

PP = Preprocess(input_size=32, crop_pct=0.9, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
BGR = replace(PP, channel_order="BGR")


def _batch(n=3, s=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8)


def test_numpy_and_torch_agree_exactly():
    torch = pytest.importorskip("torch")
    from stackvision.preprocess import Normalize

    x = _batch()
    for pp in (PP, BGR):
        for order in (None, "RGB", "BGR"):
            want = normalize(x, pp, order)
            got = Normalize(pp, order)(torch.from_numpy(x)).numpy()
            assert want.dtype == np.float32 and want.shape == (3, 3, 32, 32)
            np.testing.assert_array_equal(got, want)
            nchw = torch.from_numpy(x).permute(0, 3, 1, 2).float()
            np.testing.assert_array_equal(Normalize(pp, order).standardize(nchw).numpy(), want)
    # the old numpy arithmetic ((x / 255 - mean) / std) agrees to float32 rounding
    old = (x.astype(np.float32) / 255 - np.float32(PP.mean)) / np.float32(PP.std)
    np.testing.assert_allclose(PP.normalize(x), old.transpose(0, 3, 1, 2), atol=1e-5)


def test_bgr_pixels_are_normalised_with_their_own_channel_statistics():
    img = synthetic_image((40, 36), seed=1)
    rgb, bgr = PP.to_uint8(img), BGR.to_uint8(img)
    np.testing.assert_array_equal(bgr, rgb[..., ::-1])  # to_uint8 puts BGR pixels out
    out = normalize(bgr[None], BGR)[0]
    blue = rgb[..., 2].astype(np.float32)
    # the network's channel 0 is blue, standardised with blue's mean and std (0.3, 0.3)
    np.testing.assert_allclose(out[0], (blue - 0.3 * 255) / (0.3 * 255), rtol=1e-6)
    np.testing.assert_allclose(out[2], normalize(rgb[None], PP)[0][0], rtol=1e-6)
    # RGB input (the export/serving contract) for a BGR backbone: pixels reversed first
    np.testing.assert_array_equal(normalize(rgb[None], BGR, "RGB"), normalize(bgr[None], BGR))
    mean, std = mean_std_255(BGR)
    np.testing.assert_allclose(mean, [0.3 * 255, 0.4 * 255, 0.5 * 255], rtol=1e-6)
    np.testing.assert_allclose(std, [0.3 * 255, 0.25 * 255, 0.2 * 255], rtol=1e-6)
    with pytest.raises(ValueError, match="channel order"):
        normalize(rgb[None], PP, "rgb")


def test_importing_preprocess_and_decoding_does_not_import_torch():
    code = "import sys, stackvision.preprocess, stackvision.decoding; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_decode_crop_takes_a_path_bytes_or_an_image(tmp_path):
    from stackvision.decoding import decode_crop, decode_item
    from stackvision.images import ImageDecodeError

    img = synthetic_image((50, 40), seed=2)
    path = tmp_path / "a.png"
    img.save(path)
    want = decode_item(str(path), [("x", PP)])["x"]
    assert want.shape == (32, 32, 3) and want.dtype == np.uint8
    np.testing.assert_array_equal(decode_crop(str(path), PP), want)
    np.testing.assert_array_equal(decode_crop(path, PP), want)
    np.testing.assert_array_equal(decode_crop(path.read_bytes(), PP), want)
    np.testing.assert_array_equal(decode_crop(img, PP), want)
    np.testing.assert_array_equal(
        decode_crop(img.convert("L"), PP), decode_crop(img.convert("L").convert("RGB"), PP)
    )
    # channel order: the backbone's (to_uint8), or the RGB contract of export and serving
    np.testing.assert_array_equal(decode_crop(path, BGR), want[..., ::-1])
    np.testing.assert_array_equal(decode_crop(path, BGR, channel_order="RGB"), want)
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_crop(b"nope", PP)
    assert isinstance(decode_item(str(tmp_path / "missing.png"), [("x", PP)]), ImageDecodeError)


def test_decode_crops_keeps_order_and_reports_bad_files(tmp_path):
    from stackvision.decoding import decode_crop, decode_crops
    from stackvision.errors import StackvisionError

    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        if i == 2:
            p.write_bytes(b"broken")
        else:
            synthetic_image((40 + i, 36), seed=i).save(p)
        paths.append(str(p))
    imgs, keep, problems = decode_crops(paths, PP, workers=2)
    assert keep.tolist() == [0, 1, 3, 4] and imgs.shape == (4, 32, 32, 3)
    assert [p.path for p in problems] == [paths[2]]
    for row, i in zip(imgs, keep):
        np.testing.assert_array_equal(row, decode_crop(paths[i], PP))
    with pytest.raises(StackvisionError, match="bad image"):
        decode_crops(paths, PP, workers=2, strict=True)
    empty, keep, problems = decode_crops([], PP)
    assert empty.shape == (0, 32, 32, 3) and len(keep) == 0 and problems == []
