"""Training augmentation: presets and overrides, determinism, shapes, and the preview grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stackvision.augment import PRESETS, Augment
from stackvision.cli import main
from stackvision.errors import StackvisionError


def _img(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)


def test_parse_presets_and_overrides():
    assert Augment.parse(None) == PRESETS["none"]
    assert not Augment.parse("none").active
    assert Augment.parse("standard") == PRESETS["standard"]
    a = Augment.parse("light,rotation=25,flip=0")
    assert a.rotation == 25 and a.flip == 0 and a.zoom == PRESETS["light"].zoom
    assert Augment.parse("rotation=10").zoom == PRESETS["standard"].zoom  # overrides on standard
    for bad in ("huge", "standard,spin=3", "standard,rotation=x", "zoom=0", "flip=2"):
        with pytest.raises(StackvisionError):
            Augment.parse(bad)


def test_augment_shape_dtype_determinism():
    aug = PRESETS["strong"]
    img = _img()
    a = aug.batch(np.stack([img, img]), torch.Generator().manual_seed(3))
    b = aug.batch(np.stack([img, img]), torch.Generator().manual_seed(3))
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # same generator seed -> same augmentation
    assert not np.array_equal(a[0], img)  # it did change the image
    assert not np.array_equal(a[0], a[1])  # two draws differ


def test_none_is_identity_and_flip_mirrors():
    img = _img(1)
    g = torch.Generator().manual_seed(0)
    assert PRESETS["none"](img, g) is img
    np.testing.assert_array_equal(Augment(flip=1.0)(img, g), img[:, ::-1])


def test_augment_preview_cli(flowers_small, tmp_path):
    out = tmp_path / "grid.png"
    rc = main(
        [
            "augment-preview",
            str(flowers_small),
            "--out",
            str(out),
            "--rows",
            "2",
            "--per-image",
            "3",
            "--input-size",
            "64",
        ]
    )
    assert rc == 0
    w, h = Image.open(out).size
    assert w == 4 + (64 + 4) * 4 and h == 18 + 4 + (64 + 4) * 2
    assert main(["augment-preview", str(flowers_small), "--out", str(out), "--augment", "x"]) == 2
