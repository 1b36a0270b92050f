"""Ensembles of a feature stack and fine-tuned models: combiners, the comparison table, save/load,
``predict --format kaggle``, ``evaluate``, export of all-fine-tuned ensembles."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch

from stackvision import Runtime, StackedClassifier, load_model
from stackvision.cli import main
from stackvision.data import from_folder
from stackvision.ensemble import EnsembleClassifier, fit_stacked, fit_weights
from stackvision.finetune import FineTunedClassifier

from .conftest import FLOWERS, make_slice

CLASSES = ["daisy", "sunflower", "tulip"]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """3 flower classes x 8 images the members were not trained on (flowers_small is 0..9)."""
    return make_slice(tmp_path_factory.mktemp("flowers-heldout"), FLOWERS, CLASSES, 8, offset=10)


@pytest.fixture(scope="module")
def members(flowers_small, cache_dir, tmp_path_factory):
    """A lite0 feature stack and two head-only fine-tuned lite0 models (64 px, seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("members")
    listing = from_folder(str(flowers_small))
    stack = StackedClassifier(["lite0"], folds=3, runtime=Runtime(cache_dir, device="cpu"))
    stack.fit(listing.paths, listing.labels)
    dirs = {"stack": stack.save(str(root / "stack"), report=False)}
    for seed in (0, 1):
        ft = FineTunedClassifier(
            "lite0",
            head_epochs=3,
            epochs=0,
            lr=3e-3,
            input_size=64,
            batch_size=8,
            val_split=0.3,
            seed=seed,
            runtime=Runtime(device="cpu"),
        )
        ft.fit(listing.paths, listing.labels)
        dirs[f"ft{seed}"] = ft.save(str(root / f"ft{seed}"), report=False)
    return dirs


@pytest.fixture(scope="module")
def ens_dir(members, heldout, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "ensemble"
    rc = main(
        [
            "ensemble",
            members["stack"],
            members["ft0"],
            "--data",
            str(heldout),
            "--out",
            str(out),
            "--folds",
            "3",
            "--cache",
            cache_dir,
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert rc == 0
    return out


def test_weights_and_stacked_combiner_on_synthetic_probabilities():
    rng = np.random.default_rng(0)
    n, c = 300, 3
    y = rng.integers(0, c, n)
    good = np.full((n, c), 0.1)
    good[np.arange(n), y] = 0.8
    noise = rng.dirichlet(np.ones(c), n)
    P = np.stack([noise, good])
    w = fit_weights(P, y)
    assert w.sum() == pytest.approx(1.0) and w[1] > 0.8
    head = fit_stacked(P, y, c)
    from stackvision.ensemble import combine_stacked

    assert np.mean(combine_stacked(P, head).argmax(1) == y) > 0.95


def test_ensemble_table_and_directory(ens_dir, members):
    manifest = json.loads((ens_dir / "manifest.json").read_text())
    assert manifest["kind"] == "ensemble" and manifest["format_version"] == 2
    assert manifest["method"] in ("mean", "weighted", "calibrated", "stacked")
    assert [m["kind"] for m in manifest["members"]] == ["stack", "finetune"]
    for m in manifest["members"]:  # self-contained: members copied inside
        assert (ens_dir / m["dir"] / "manifest.json").is_file()
    assert sum(manifest["member_weights"]) == pytest.approx(1.0)
    table = json.loads((ens_dir / "comparison.json").read_text())
    assert [r["model"] for r in table] == [
        "stack",
        "ft0",
        "ensemble:mean",
        "ensemble:weighted",
        "ensemble:calibrated",
        "ensemble:stacked",
    ]
    assert all(r["n_images"] == 24 for r in table)  # every row on the same held-out images
    assert all("out-of-fold" in r["scored"] for r in table[3:])
    kept = min(table[2:], key=lambda r: r["log_loss"])
    assert f"ensemble:{manifest['method']}" == kept["model"]
    assert (ens_dir / "report" / "report.html").is_file()


def test_ensemble_reload_predicts_the_same(ens_dir, members, heldout, cache_dir, tmp_path):
    paths = sorted(str(p) for p in heldout.rglob("*.jpg"))
    ens = load_model(str(ens_dir), cache_dir=cache_dir, device="cpu")
    assert isinstance(ens, EnsembleClassifier) and ens.classes_ == CLASSES
    proba = ens.predict_proba(paths)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    # The members inside the directory are the models given; mean = average of their outputs.
    a = load_model(members["stack"], cache_dir=cache_dir, device="cpu").predict_proba(paths)
    b = load_model(members["ft0"], device="cpu").predict_proba(paths)
    np.testing.assert_allclose(
        ens.predict_paths(paths, method="mean").proba, (a + b) / 2, atol=1e-6
    )
    # Still works after the original member folders are gone (copied inside), and after a move.
    moved = tmp_path / "moved"
    shutil.copytree(ens_dir, moved)
    again = load_model(str(moved), cache_dir=cache_dir, device="cpu")
    np.testing.assert_allclose(again.predict_proba(paths), proba, atol=1e-6)
    assert ens.score(paths, [p.split("/")[-2] for p in paths]) > 0.5


def test_predict_kaggle_and_evaluate_on_ensemble(ens_dir, heldout, cache_dir, tmp_path, capsys):
    rc = main(["predict", str(ens_dir), str(heldout), "--format", "kaggle", "--cache", cache_dir,
               "-q"])  # fmt: skip
    assert rc == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["id", *CLASSES] and len(rows) == 25
    assert all(abs(sum(map(float, r[1:])) - 1) < 1e-4 for r in rows[1:])
    out = tmp_path / "eval"
    rc = main(["evaluate", str(ens_dir), str(heldout), "--out", str(out), "--cache", cache_dir,
               "-q"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 24


def test_finetuned_only_ensemble_exports_and_mixed_one_refuses(members, heldout, cache_dir):
    paths = sorted(str(p) for p in heldout.rglob("*.jpg"))
    listing = from_folder(str(heldout))
    ens = EnsembleClassifier([members["ft0"], members["ft1"]], method="stacked", folds=3)
    ens.fit(listing.paths, listing.labels)
    # a combiner fitted per fold: each fold's scores, for the report's spread across folds
    folds, m = ens.metrics_["folds"], ens.metrics_
    assert [f["fold"] for f in folds] == [1, 2, 3] and sum(f["n_images"] for f in folds) == 24
    acc = sum(f["accuracy"] * f["n_images"] for f in folds) / m["n_images"]
    assert acc == pytest.approx(m["accuracy"])
    mod = ens.to_torch_module()
    pp = ens.input_preprocess()
    from stackvision.images import load_rgb

    batch = np.stack([pp.to_uint8(load_rgb(p, pp.resize_size)) for p in paths[:5]])
    with torch.no_grad():
        out = mod(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(out, ens.predict_proba(paths[:5]), atol=1e-5)

    # Members of different input sizes: the largest member's input, resized inside for the others.
    mixed = EnsembleClassifier([members["stack"], members["ft0"]], method="mean", folds=3,
                               runtime=Runtime(cache_dir))  # fmt: skip
    mixed.fit(listing.paths, listing.labels)
    pp = mixed.input_preprocess()
    assert pp.input_size == 224
    batch = np.stack([pp.to_uint8(load_rgb(p, pp.resize_size)) for p in paths[:3]])
    with torch.no_grad():
        out = mixed.to_torch_module()(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(out, mixed.forward_uint8(batch), atol=1e-5)


def test_ensemble_user_errors(members, heldout, tmp_path, capsys):
    out = str(tmp_path / "e")
    assert main(["ensemble", members["ft0"], "--data", str(heldout), "--out", out, "-q"]) == 2
    assert main(["ensemble", members["ft0"], members["ft1"], "--out", out, "-q"]) == 2
    two = tmp_path / "two"
    for c in CLASSES[:2]:
        shutil.copytree(heldout / c, two / c)
    listing = from_folder(str(two))
    small = FineTunedClassifier("lite0", head_epochs=1, epochs=0, input_size=64, val_split=0.3,
                                runtime=Runtime(device="cpu")).fit(listing.paths, listing.labels)  # fmt: skip
    small_dir = small.save(str(tmp_path / "small"), report=False)
    assert (
        main(["ensemble", members["ft0"], small_dir, "--data", str(heldout), "--out", out, "-q"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "other classes" in err
