"""StackedClassifier end to end on real dog photos: folds, TTA, heads, calibration, persistence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stackvision import Runtime, StackedClassifier, StackvisionError, load_model
from stackvision.engines import numbers_id
from stackvision.heads import MLPHead, softmax
from stackvision.validation import apply_temperature, fit_temperature

from .conftest import ROOT, labelled_jpegs


@pytest.fixture(scope="module")
def fitted(woof_train, cache_dir):
    X, y = labelled_jpegs(woof_train)
    return StackedClassifier(["lite0"], folds=3, tta="flip", runtime=Runtime(cache_dir)).fit(X, y)


def test_kfold_flip_model_learns_dog_breeds(fitted, woof_val):
    m = fitted
    assert m.classes_ == sorted(set(m.classes_)) and len(m.classes_) == 4
    assert len(m.heads_) == 3 and m.n_views_ == 2
    assert m.metrics_["validation"] == "3-fold out-of-fold" and m.metrics_["n_images"] == 48
    assert m.metrics_["accuracy"] > 0.7  # chance is 0.25
    X, y = labelled_jpegs(woof_val)
    proba = m.predict_proba(X)
    assert proba.shape == (24, 4)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    assert m.score(X, y) > 0.7
    assert set(m.metrics_["per_class"]) == set(m.classes_)


def test_tta_averages_the_original_and_flipped_logits_of_every_fold_head(fitted, woof_val):
    X, _ = labelled_jpegs(woof_val)
    feats = fitted._features(X[:4])
    both = fitted.predict_features(feats.stacked())
    per_view = [
        np.mean([h.decision_function(feats.stacked()[:, v]) for h in fitted.heads_], axis=0)
        for v in (0, 1)
    ]
    expect = apply_temperature(softmax((per_view[0] + per_view[1]) / 2), fitted.temperature_)
    np.testing.assert_allclose(both, expect, atol=1e-6)


def test_saved_model_gives_identical_probabilities_in_another_process(
    fitted, woof_val, tmp_path, cache_dir
):
    path = fitted.save(str(tmp_path / "model"))
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["kind"] == "stack"
    assert manifest["classes"] == fitted.classes_
    assert manifest["backbones"][0]["weights_id"].startswith("sha256:")
    assert manifest["backbones"][0]["preprocess"]["input_size"] == 224
    X, _ = labelled_jpegs(woof_val)
    expect = fitted.predict_proba(X)
    out = tmp_path / "proba.npy"
    code = (
        "import sys, numpy as np; from stackvision import load_model;"
        "m = load_model(sys.argv[1], cache_dir=sys.argv[2]);"
        "np.save(sys.argv[3], m.predict_proba(sys.argv[4:]))"
    )
    subprocess.run(
        [sys.executable, "-c", code, path, cache_dir, str(out), *X], check=True, cwd=ROOT
    )
    np.testing.assert_array_equal(np.load(out), expect)
    assert load_model(path, cache_dir=cache_dir).classes_ == fitted.classes_


def test_other_format_version_is_refused(fitted, tmp_path):
    path = fitted.save(str(tmp_path / "m"), report=False)
    mf = tmp_path / "m" / "manifest.json"
    data = json.loads(mf.read_text())
    data["format_version"] = 99
    mf.write_text(json.dumps(data))
    with pytest.raises(StackvisionError, match="format version 99.*upgrade stackvision"):
        load_model(path)


def test_save_replaces_atomically_and_keeps_no_temp_dirs(fitted, tmp_path):
    fitted.save(str(tmp_path / "m"), report=False)
    fitted.save(str(tmp_path / "m"), report=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_mlp_head_early_stopping_history_and_holdout(woof_train, woof_val, cache_dir):
    X, y = labelled_jpegs(woof_train)
    Xv, yv = labelled_jpegs(woof_val)
    m = StackedClassifier(
        ["lite0"],
        head="mlp",
        head_params={"hidden": 64, "epochs": 60, "patience": 4},
        folds=0,
        tta="none",
        runtime=Runtime(cache_dir),
    ).fit(X, y, val=(Xv, yv))
    (hist,) = m.histories_
    assert 1 < len(hist) <= 60
    assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(hist[0])
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert m.metrics_["validation"] == "hold-out" and m.metrics_["n_images"] == 24
    assert m.metrics_["accuracy"] > 0.6


def test_mlp_restores_best_weights_and_reduces_lr():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 20)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    Xv = rng.normal(size=(60, 20)).astype(np.float32)
    yv = rng.integers(0, 2, 60)  # unlearnable validation labels: val loss only gets worse
    h = MLPHead(hidden=32, epochs=40, patience=6, lr_patience=1, lr=1e-2).fit(X, y, 2, Xv, yv)
    best = int(np.argmin([e["val_loss"] for e in h.history]))
    assert len(h.history) == best + 1 + 7  # stopped after patience + 1 bad epochs
    assert h.history[-1]["lr"] < h.history[0]["lr"]
    loss = -np.mean(np.log(h.predict_proba(Xv)[np.arange(60), yv]))
    assert loss == pytest.approx(h.history[best]["val_loss"], rel=1e-4)


def test_val_split_and_class_weight(woof_train, cache_dir):
    X, y = labelled_jpegs(woof_train)
    m = StackedClassifier(
        ["lite0"],
        folds=0,
        val_split=0.25,
        tta="none",
        class_weight="balanced",
        runtime=Runtime(cache_dir),
    ).fit(X, y)
    assert m.metrics_["n_images"] == 12 and len(m.train_y_) == 36


def test_temperature_calibration_lowers_log_loss():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 500)
    logits = rng.normal(size=(500, 5))
    logits[np.arange(500), y] += 1.0
    over = np.exp(logits * 4) / np.exp(logits * 4).sum(1, keepdims=True)  # overconfident
    t = fit_temperature(over, y)
    nll = lambda p: -np.mean(np.log(p[np.arange(500), y]))  # noqa: E731
    assert t > 2 and nll(apply_temperature(over, t)) < nll(over) - 0.1


def test_parameters_are_validated_at_fit(woof_train, cache_dir):
    X, y = labelled_jpegs(woof_train)
    for kwargs, msg in [
        ({"head": "svm"}, "head must be one of 'logreg', 'mlp'"),
        ({"folds": 1}, "folds must be an integer >= 2 or 0, got 1"),
        ({"tta": "rot90"}, "tta must be one of"),
        ({"head_params": {"bogus": 1}}, "logreg head: unknown parameter .bogus."),
        ({"backbones": ["lite0", "nope"]}, "unknown backbone 'nope'"),
    ]:
        with pytest.raises(StackvisionError, match=msg):
            StackedClassifier(
                **{"backbones": ["lite0"], "runtime": Runtime(cache_dir), **kwargs}
            ).fit(X, y)
    with pytest.raises(StackvisionError, match="not fitted"):
        StackedClassifier().predict(X)


def test_compare_table_shows_backbones_flips_and_fold_ensemble(woof_train, woof_val, cache_dir):
    from stackvision.compare import compare_table

    X, y = labelled_jpegs(woof_train)
    Xv, yv = labelled_jpegs(woof_val)
    m = StackedClassifier(["lite0", "lite1"], folds=2, tta="flip", runtime=Runtime(cache_dir)).fit(
        X, y, val=(Xv, yv)
    )
    rows = compare_table(m)
    keys = [(r["model"], r["views"], r["heads"]) for r in rows]
    assert keys == [
        ("lite0", "orig", "2 folds"),
        ("lite0", "orig+flip", "2 folds"),
        ("lite1", "orig", "2 folds"),
        ("lite1", "orig+flip", "2 folds"),
        ("lite0+lite1 (stack)", "orig", "2 folds"),
        ("lite0+lite1 (stack)", "orig+flip", "2 folds"),
        ("lite0+lite1 (stack)", "orig+flip", "fold 1 alone"),
    ]
    assert all(0 <= r["val_log_loss"] < 2 and r["val_accuracy"] > 0.5 for r in rows), rows
    # the last ensemble row is the real model: same numbers as its hold-out metrics
    assert rows[-2]["val_log_loss"] == pytest.approx(m.metrics_["holdout"]["log_loss"], rel=1e-5)


def test_int8_model_keeps_its_calibration_through_save_and_load(woof_train, cache_dir, tmp_path):
    X, y = labelled_jpegs(woof_train)
    m = StackedClassifier(
        ["lite0"], folds=2, tta="none", runtime=Runtime(cache_dir, precision="int8")
    ).fit(X, y)
    assert m.metrics_["accuracy"] > 0.7
    assert set(m.calibration_) == {"lite0"}
    path = m.save(str(tmp_path / "int8"), report=False)
    again = load_model(path, cache_dir=cache_dir)
    assert again.precision_ == "int8" and again.calibration_ == m.calibration_
    np.testing.assert_array_equal(again.predict_proba(X[:6]), m.predict_proba(X[:6]))
    # int8 features live in their own store, keyed by the calibration set
    stores = {
        json.loads(p.read_text())["numbers"] for p in Path(cache_dir, "features-v1").glob("*.json")
    }
    # nncf where OpenVINO + NNCF are installed, else ONNX Runtime's quantiser
    assert numbers_id("auto", "int8", m.calibration_["lite0"], device="cpu") in stores
    assert any(s.startswith("int8-") and s.endswith(m.calibration_["lite0"]) for s in stores)
