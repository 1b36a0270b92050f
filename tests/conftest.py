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


@pytest.fixture()
def one_torch_thread():
    """Small matrices: one thread is faster and keeps the numbers independent of a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def labelled_jpegs(folder) -> tuple[list[str], list[str]]:
    """The JPEGs under a class-folder slice (sorted) and their labels (the folder names)."""
    paths = sorted(str(p) for p in Path(folder).rglob("*.JPEG"))
    return paths, [p.split("/")[-2] for p in paths]


def synthetic_image(size=(64, 48), seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return (
        Image.fromarray(arr, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(arr, "RGB")
    )


# ---------------------------------------------------------------------- one model of each kind
# Built once per session by the CLI verbs themselves (train, finetune, ensemble) on 3 flower
# classes x 10 images, lite0 only, and shared by every test that needs a model of each kind.
FLOWER_CLASSES = ["daisy", "sunflower", "tulip"]


@pytest.fixture(scope="session")
def heldout(tmp_path_factory) -> Path:
    """3 flower classes x 4 images the models were not trained on (flowers_small is 0..9)."""
    return make_slice(tmp_path_factory.mktemp("heldout"), FLOWERS, FLOWER_CLASSES, 4, offset=10)


@pytest.fixture(scope="session")
def kinds_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kinds")


def _cli_train(data, out: Path, cache_dir: str, *extra: str) -> Path:
    from stackvision.cli import main

    args = ["train", str(data), "--out", str(out), "--backbones", "lite0", "--folds", "2"]
    assert main([*args, "--cache", cache_dir, "--device", "cpu", "-q", *extra]) == 0
    return out


@pytest.fixture(scope="session")
def stack_dir(flowers_small, cache_dir, kinds_root) -> Path:
    return _cli_train(flowers_small, kinds_root / "stack", cache_dir)


@pytest.fixture(scope="session")
def mlp_dir(flowers_small, cache_dir, kinds_root) -> Path:
    return _cli_train(flowers_small, kinds_root / "mlp", cache_dir, "--head", "mlp")


@pytest.fixture(scope="session")
def ft_dir(flowers_small, kinds_root) -> Path:
    """Head-only fine-tuning, one epoch at 64 px: enough to have a model of that kind."""
    from stackvision.cli import main

    out = kinds_root / "ft"
    args = ["finetune", str(flowers_small), "--out", str(out), "--backbone", "lite0"]
    args += ["--head-epochs", "1", "--epochs", "0", "--input-size", "64", "--batch-size", "8"]
    assert main([*args, "--val-split", "0.3", "--device", "cpu", "-q"]) == 0
    return out


@pytest.fixture(scope="session")
def ens_dir(stack_dir, ft_dir, heldout, cache_dir, kinds_root) -> Path:
    from stackvision.cli import main

    out = kinds_root / "ens"
    args = ["ensemble", str(stack_dir), str(ft_dir), "--data", str(heldout), "--out", str(out)]
    # mean: both members count (the best-by-log-loss pick may weight one of them to zero)
    assert main([*args, "--method", "mean", "--cache", cache_dir, "--device", "cpu", "-q"]) == 0
    return out


#: test id -> (model directory fixture, the kind its manifest names)
KINDS = {
    "stack-logreg": ("stack_dir", "stack"),
    "stack-mlp": ("mlp_dir", "stack"),
    "finetune": ("ft_dir", "finetune"),
    "ensemble": ("ens_dir", "ensemble"),
}


# ---------------------------------------------------------------------- a many-class model
# 86 bird species x 3 images from cub86/train (3-fold stack, lite0, no TTA) and an evaluation on
# 86 x 1 images of cub86/val: enough classes for the report's many-class layout, built once.
CUB = SHARED_DATA / "cub86"


@pytest.fixture(scope="session")
def cub_train(tmp_path_factory) -> Path:
    _require(CUB / "train")
    classes = sorted(os.listdir(CUB / "train"))
    return make_slice(tmp_path_factory.mktemp("cub-train"), CUB / "train", classes, 3)


@pytest.fixture(scope="session")
def cub_val(tmp_path_factory) -> Path:
    _require(CUB / "val")
    classes = sorted(os.listdir(CUB / "val"))
    return make_slice(tmp_path_factory.mktemp("cub-val"), CUB / "val", classes, 1)


@pytest.fixture(scope="session")
def cub_dir(cub_train, cache_dir, kinds_root) -> Path:
    """A stack trained by `stackvision train` on 86 classes (3 folds, lite0, --tta none)."""
    from stackvision.cli import main

    out = kinds_root / "cub"
    args = ["train", str(cub_train), "--out", str(out), "--backbones", "lite0", "--folds", "3"]
    assert main([*args, "--tta", "none", "--cache", cache_dir, "--device", "cpu", "-q"]) == 0
    return out


@pytest.fixture(scope="session")
def cub_eval(cub_dir, cub_val, cache_dir, kinds_root) -> Path:
    """`stackvision evaluate` of :func:`cub_dir` on 86 held-out images."""
    from stackvision.cli import main

    out = kinds_root / "cub-eval"
    args = ["evaluate", str(cub_dir), str(cub_val), "--out", str(out), "--cache", cache_dir]
    assert main([*args, "--device", "cpu", "-q"]) == 0
    return out
