"""The extraction pipeline and its cache: nothing computed twice, changes recomputed, kill-safe."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from stackvision.backbones import resolve
from stackvision.cache import FeatureCache
from stackvision.errors import StackvisionError
from stackvision.extract import extract

from .conftest import ROOT, WOOF


def _paths(folder):
    return sorted(str(p) for p in folder.rglob("*.JPEG"))


def test_second_run_computes_nothing_and_features_are_stable(woof_train, cache_dir):
    paths = _paths(woof_train)[:16]
    spec = resolve("lite0")
    first = extract(paths, [spec], views=("orig", "flip"), cache=FeatureCache(cache_dir))
    again = extract(paths, [spec], views=("orig", "flip"), cache=FeatureCache(cache_dir))
    assert again.stats["n_computed"] == 0 and again.stats["n_cached"] == 16
    np.testing.assert_array_equal(first.blocks["lite0"], again.blocks["lite0"])
    assert first.blocks["lite0"].shape == (16, 2, 1280)
    # the flip view is a different, but close, feature vector
    orig, flip = first.blocks["lite0"][:, 0], first.blocks["lite0"][:, 1]
    assert not np.allclose(orig, flip)
    cos = (orig * flip).sum(1) / np.linalg.norm(orig, axis=1) / np.linalg.norm(flip, axis=1)
    assert cos.min() > 0.7


def test_adding_a_backbone_computes_only_that_backbone(woof_train, tmp_path):
    paths = _paths(woof_train)[:6]
    cache = FeatureCache(str(tmp_path))
    extract(paths, [resolve("lite0")], cache=cache)
    both = extract(paths, [resolve("lite0"), resolve("lite1")], cache=cache)
    assert both.stats["computed_per_backbone"] == {"lite0": 0, "lite1": 6}
    assert both.stacked().shape == (6, 1, 2560)
    # a flip view asked later is computed for that view only
    flips = extract(paths, [resolve("lite0")], views=("orig", "flip"), cache=cache)
    assert flips.stats["computed_per_backbone"] == {"lite0": 6}


def test_adding_tta_flip_computes_the_flip_view_only(woof_train, tmp_path, monkeypatch):
    import stackvision.extract as ex

    paths = _paths(woof_train)[:5]
    cache = FeatureCache(str(tmp_path))
    extract(paths, [resolve("lite0")], cache=cache)
    fed: list[int] = []
    real = ex.create_engine

    def counting(*a, **k):
        engine = real(*a, **k)
        features = engine.features
        engine.features = lambda x: (fed.append(len(x)), features(x))[1]
        return engine

    monkeypatch.setattr(ex, "create_engine", counting)
    flips = extract(paths, [resolve("lite0")], views=("orig", "flip"), cache=cache)
    assert sum(fed) == 5  # the 5 flipped images; the cached orig view is not run again
    assert flips.stacked().shape == (5, 2, 1280)
    again = extract(paths + _paths(woof_train)[5:7], [resolve("lite0")], views=("orig", "flip"),
                    cache=cache)  # fmt: skip
    assert sum(fed) == 5 + 4 and again.stats["n_computed"] == 2  # new images: both views


def test_changed_image_is_recomputed_renamed_one_is_not(woof_train, tmp_path):
    work = tmp_path / "imgs"
    work.mkdir()
    srcs = _paths(woof_train)[:3]
    for i, s in enumerate(srcs):
        shutil.copyfile(s, work / f"{i}.jpg")
    paths = [str(work / f"{i}.jpg") for i in range(3)]
    cache = FeatureCache(str(tmp_path / "cache"))
    before = extract(paths, [resolve("lite0")], cache=cache)
    shutil.copyfile(srcs[2], work / "0.jpg")  # content of image 0 changes
    os.rename(work / "1.jpg", work / "renamed.jpg")
    paths[1] = str(work / "renamed.jpg")
    after = extract(paths, [resolve("lite0")], cache=cache)
    assert after.stats["n_computed"] == 0  # 0.jpg now has 2.jpg's content, already cached
    np.testing.assert_array_equal(after.blocks["lite0"][0], before.blocks["lite0"][2])
    (work / "0.jpg").write_bytes((work / "0.jpg").read_bytes() + b"\0")  # new content
    assert extract(paths, [resolve("lite0")], cache=cache).stats["n_computed"] == 1


def test_bad_images_are_reported_not_dropped_silently(woof_train, tmp_path, cache_dir):
    good = _paths(woof_train)[:2]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.png"
    junk.write_text("not a png")
    paths = [good[0], str(empty), good[1], str(junk)]
    f = extract(paths, [resolve("lite0")], cache=FeatureCache(cache_dir))
    assert f.paths == [good[0], good[1]] and f.index.tolist() == [0, 2]
    assert {p.path: p.reason for p in f.problems} == {
        str(empty): "empty file (0 bytes)",
        str(junk): "not an image file (unknown format)",
    }
    with pytest.raises(StackvisionError, match="junk.png"):
        extract(
            [good[0], str(junk)], [resolve("lite0")], cache=FeatureCache(cache_dir), strict=True
        )


def _rows(cache_root):
    total = 0
    for name in (
        os.listdir(os.path.join(cache_root, "features-v1"))
        if os.path.isdir(os.path.join(cache_root, "features-v1"))
        else []
    ):
        if name.endswith(".sqlite"):
            try:
                with sqlite3.connect(
                    os.path.join(cache_root, "features-v1", name), timeout=5
                ) as db:
                    total += db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
            except sqlite3.OperationalError:
                pass
    return total


def test_killed_extraction_resumes_without_loss_or_corruption(tmp_path):
    paths = sorted(str(p) for p in (WOOF / "val" / "n02088364").iterdir())[:40]
    listfile = tmp_path / "paths.txt"
    listfile.write_text("\n".join(paths))
    cache_root = str(tmp_path / "cache")
    script = (
        "import sys; from stackvision.backbones import resolve; from stackvision.cache import FeatureCache;"
        "from stackvision.extract import extract;"
        "paths=open(sys.argv[1]).read().split('\\n');"
        "extract(paths,[resolve('lite0')],cache=FeatureCache(sys.argv[2]),batch_size=4)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(listfile), cache_root], cwd=ROOT)
    deadline = time.time() + 240
    while _rows(cache_root) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _rows(cache_root)
    assert 0 < done < 40, f"kill landed outside the run ({done} rows)"
    assert done % 4 == 0  # whole batches only: a batch is one transaction
    resumed = extract(paths, [resolve("lite0")], cache=FeatureCache(cache_root), batch_size=4)
    assert resumed.stats["n_computed"] == 40 - done
    fresh = extract(
        paths, [resolve("lite0")], cache=FeatureCache(str(tmp_path / "fresh")), batch_size=4
    )
    np.testing.assert_allclose(resumed.blocks["lite0"], fresh.blocks["lite0"], atol=1e-4)
