"""Augmented training views (train_views.py): the crops, their cache rows, the heads' extra rows,
and ``train --train-views`` through the CLI."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from stackvision import Runtime, StackedClassifier
from stackvision.backbones import resolve
from stackvision.cache import FeatureCache
from stackvision.cli import main
from stackvision.engines import create_engine
from stackvision.errors import StackvisionError
from stackvision.extract import check_args, extract
from stackvision.heads import LogRegHead
from stackvision.preprocess import Preprocess
from stackvision.train_views import ViewCrop, is_train_view, view_names

from .cli_helpers import one_line_error
from .conftest import labelled_jpegs


def test_a_view_is_one_crop_at_any_decode_scale_and_each_view_its_own():
    pp = Preprocess(input_size=64)
    crop = ViewCrop(pp, "rrc35.1", "0f" * 32)
    (x0, y0, x1, y1), flip = crop.box(640, 480)
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    assert 0.35 * 640 * 480 * 0.999 <= (x1 - x0) * (y1 - y0) <= 640 * 480  # area 35-100%
    assert 3 / 4 - 1e-6 <= (x1 - x0) / (y1 - y0) <= 4 / 3 + 1e-6
    half, flip_half = crop.box(320, 240)  # a JPEG draft decode at half scale: the same crop
    np.testing.assert_allclose(half, np.array([x0, y0, x1, y1]) / 2)
    assert flip_half == flip and crop.box(640, 480) == ((x0, y0, x1, y1), flip)
    views = [ViewCrop(pp, v, "0f" * 32).box(640, 480) for v in view_names(16)]
    assert len({box for box, _ in views}) == 16  # every view its own crop
    assert {f for _, f in views} == {True, False}  # about half of them flipped
    other = ViewCrop(pp, "rrc35.1", "1e" * 32).box(640, 480)
    assert other != crop.box(640, 480)  # another image (content hash): another crop
    (x0, y0, x1, y1), _ = ViewCrop(pp, "rrc35.3", "ab").box(4000, 10)  # no crop fits: centre square
    assert (x1 - x0, y1 - y0) == (10, 10) and x0 == 1995
    assert pickle.loads(pickle.dumps(crop)) == crop  # decode processes get it by pickle
    arr = crop.to_uint8(Image.new("RGB", (640, 480), (200, 10, 30)))
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8 and (arr[..., 0] == 200).all()


def test_view_names_and_who_may_make_them():
    assert view_names(3) == ("rrc35.1", "rrc35.2", "rrc35.3")
    assert is_train_view("rrc35.2") and not is_train_view("rrc35.0")
    assert not is_train_view("rrc35.x") and not is_train_view("flip")
    check_args(("orig", "rrc35.1"), 32, train_views=True)
    with pytest.raises(StackvisionError, match="local runner only"):
        check_args(("orig", "rrc35.1"), 32)  # the Ray runner's check
    with pytest.raises(StackvisionError, match="unknown view 'crop'"):
        check_args(("crop",), 32, train_views=True)


def test_extract_caches_the_views_it_crops_and_computes_them_once(woof_train, tmp_path):
    paths = labelled_jpegs(woof_train)[0][:5]
    spec = resolve("lite0")
    cache = FeatureCache(str(tmp_path / "cache"))
    views = ("orig", "flip", *view_names(2))
    f = extract(paths, [spec], views=views, cache=cache, device="cpu")
    block = f.blocks["lite0"]
    assert block.shape == (5, 4, 1280) and f.stats["n_computed"] == 5
    for a, b in [(0, 2), (1, 2), (2, 3), (0, 3)]:  # four different pictures of each image
        assert np.abs(block[:, a] - block[:, b]).max() > 0.1
    # the row is the backbone's features of the view's crop of the decoded image
    engine = create_engine(spec, cache_dir=cache.base, device="cpu")
    crops = [ViewCrop(spec.preprocess, "rrc35.2", h) for h in f.hashes]
    x = np.stack([c.to_uint8(Image.open(p).convert("RGB")) for c, p in zip(crops, paths)])
    np.testing.assert_allclose(engine.features(x), block[:, 3], atol=1e-4)
    again = extract(paths, [spec], views=views, cache=cache, device="cpu")
    assert again.stats["n_computed"] == 0 and np.array_equal(again.blocks["lite0"], block)
    # the GPU decoder does not make crops: the views come from PIL, the same rows
    tv = extract(paths, [spec], views=views[2:], cache=cache, device="cpu", decoder="torchvision")
    assert tv.stats["n_computed"] == 0 and np.array_equal(tv.blocks["lite0"], block[:, 2:])


def test_the_heads_fit_on_the_extra_rows_and_every_score_uses_the_original_views(
    woof_train, woof_val, cache_dir, tmp_path, monkeypatch
):
    paths, labels = labelled_jpegs(woof_train)  # 4 breeds x 12
    rows = []
    fit = LogRegHead.fit

    def counting_fit(self, X, y, *a, **k):
        rows.append(len(X))
        return fit(self, X, y, *a, **k)

    monkeypatch.setattr(LogRegHead, "fit", counting_fit)
    rt = Runtime(cache_dir=cache_dir, device="cpu")
    model = StackedClassifier(["lite0"], folds=2, train_views=2, runtime=rt).fit(paths, labels)
    assert rows == [24 * 4, 24 * 4]  # each fold: 24 images x (orig, flip, 2 crops)
    assert model.oof_proba_.shape == (48, 4) and model.metrics_["n_images"] == 48
    plain = StackedClassifier(["lite0"], folds=2, runtime=rt).fit(paths, labels)
    assert rows[2:] == [24 * 2, 24 * 2]
    assert not np.allclose(model.heads_[0].coef_, plain.heads_[0].coef_)
    vp, vl = labelled_jpegs(woof_val)
    pred = model.predict_paths(vp)
    assert (np.asarray(pred.classes)[pred.proba.argmax(1)] == np.asarray(vl)).mean() >= 0.75
    out = model.save(str(tmp_path / "m"))
    back = StackedClassifier.load(out, rt)
    assert back.train_views == 2 and back.manifest_["train_views"] == 2
    np.testing.assert_allclose(back.predict_paths(vp).proba, pred.proba, atol=1e-6)
    with pytest.raises(Exception, match="train_views"):
        StackedClassifier(["lite0"], train_views=-1, runtime=rt).fit(paths, labels)


def test_train_views_through_the_cli(woof_train, woof_val, cache_dir, tmp_path, capsys):
    out = tmp_path / "model"
    args = ["train", str(woof_train), "--out", str(out), "--backbones", "lite0", "--folds", "2"]
    assert main([*args, "--train-views", "1", "--cache", cache_dir, "--device", "cpu"]) == 0
    assert "1 training views" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    assert '"train_views": 1' in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "train_views" in capsys.readouterr().out
    img = labelled_jpegs(woof_val)[0][0]
    assert main(["predict", str(out), img, "--cache", cache_dir, "-q"]) == 0
    assert main([*args, "--train-views", "-1", "--overwrite"]) == 2
    one_line_error(capsys, "--train-views")
    assert main([*args, "--train-views", "2", "--from-shards", str(tmp_path)]) == 2
    one_line_error(capsys, "--train-views needs images")


@pytest.mark.parametrize(
    "kw", [{"folds": 0, "val_split": 0.25}, {"folds": 0}, {"folds": 2, "head": "mlp"}]
)
def test_single_heads_hold_outs_and_mlp_heads_take_the_extra_rows(woof_train, woof_val, cache_dir, kw):  # fmt: skip
    paths, labels = labelled_jpegs(woof_train)
    vp, vl = labelled_jpegs(woof_val)
    rt = Runtime(cache_dir=cache_dir, device="cpu")
    if kw.get("head") == "mlp":
        kw = {**kw, "head_params": {"hidden": 16, "epochs": 3, "patience": 1}}
    val = (vp, vl) if kw == {"folds": 0} else None  # a separate validation set: its own views
    model = StackedClassifier(["lite0"], train_views=1, runtime=rt, **kw)
    model.fit(paths, labels, val=val)
    pred = model.predict_paths(vp)
    assert pred.proba.shape == (24, 4)
    assert (np.asarray(pred.classes)[pred.proba.argmax(1)] == np.asarray(vl)).mean() >= 0.75
    if kw.get("folds") == 0:  # scored on the hold-out's original views
        n_val = 24 if val else 12
        assert model.metrics_["validation"] == "hold-out" and model.metrics_["n_images"] == n_val


def test_the_manifest_table_allows_exactly_the_views_a_model_can_have():
    # model_schema keeps MAX_VIEWS as a literal (reading a model imports no PIL): keep them equal
    from stackvision.model_schema import Invalid, check, manifest_tables
    from stackvision.train_views import MAX_VIEWS

    rule = manifest_tables()["stack"].optional["train_views"]
    check(rule, MAX_VIEWS)
    with pytest.raises(Invalid):
        check(rule, MAX_VIEWS + 1)
