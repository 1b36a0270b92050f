"""Shared fixtures: small fixed slices of the real data in ../shared/data, generated images, and
one feature cache per test session (features of a slice are computed once for all tests)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
WOOF = SHARED_DATA / "imagewoof"
FLOWERS = SHARED_DATA / "flowers5"

# Imagewoof synsets used by the slices (Shih-Tzu, Rhodesian ridgeback, beagle, golden retriever).
WOOF_CLASSES = ["n02086240", "n02087394", "n02088364", "n02099601"]


def _require(path: Path) -> None:
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")


def make_slice(dst: Path, src: Path, classes: list[str], per_class: int, offset: int = 0) -> Path:
    """Copy a fixed, sorted slice of a class-folder data set into ``dst`` (a tmp folder)."""
    _require(src)
    for c in classes:
        files = sorted(os.listdir(src / c))[offset : offset + per_class]
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(src / c / f, dst / c / f)
    return dst


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """A feature cache shared by the whole session, so each slice is extracted once."""
    return str(tmp_path_factory.mktemp("feature-cache"))


@pytest.fixture(scope="session")
def woof_train(tmp_path_factory) -> Path:
    """4 dog breeds x 12 images from imagewoof/train."""
    return make_slice(tmp_path_factory.mktemp("woof-train"), WOOF / "train", WOOF_CLASSES, 12)


@pytest.fixture(scope="session")
def woof_val(tmp_path_factory) -> Path:
    """The same 4 breeds x 6 images from imagewoof/val."""
    return make_slice(tmp_path_factory.mktemp("woof-val"), WOOF / "val", WOOF_CLASSES, 6)


@pytest.fixture(scope="session")
def flowers_small(tmp_path_factory) -> Path:
    """3 flower classes x 10 images."""
    return make_slice(
        tmp_path_factory.mktemp("flowers"), FLOWERS, ["daisy", "sunflower", "tulip"], 10
    )


def synthetic_image(size=(64, 48), seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return (
        Image.fromarray(arr, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(arr, "RGB")
    )
