"""Readouts (pooling, mid-level stages), NAME@SIZE input sizes and ``--head auto``, on real images."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from stackvision import Runtime, StackedClassifier, StackvisionError, load_model
from stackvision.backbones import DEFAULT_STACK, FINE_GRAINED, resolve
from stackvision.cache import FeatureCache, store_fields, store_key
from stackvision.cli import main
from stackvision.data import from_folder
from stackvision.extract import extract
from stackvision.head_select import select_head
from stackvision.readout import expand_named, parse_readout

from .cli_helpers import one_line_error
from .serving_helpers import run_onnx_alone


def _images(folder, n=None) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*.jpg"))[:n]


def test_readout_and_size_change_dims_preprocessing_and_cache_key(flowers_small, cache_dir):
    plain = resolve("lite0")
    # the default keeps its old cache key fields: no readout recorded anywhere
    assert store_fields(plain, "avg", "fp32")["pool"] == "avg" and "readout" not in plain.to_dict()
    mid = resolve("lite0+gem+mid2")
    assert mid.feature_dim == 1280 + 112 + 320 and mid.readout == "gem+mid2"
    assert resolve("lite0", pool="gem+mid2").feature_dim == mid.feature_dim  # stack-wide form
    big = resolve("lite0@256")
    assert big.preprocess.input_size == 256 and big.feature_dim == 1280
    assert big.preprocess.crop_pct == plain.preprocess.crop_pct  # crop kept, resize scales
    assert big.preprocess.resize_size == int(256 / plain.preprocess.crop_pct)
    keys = {store_key(store_fields(s, "avg", "fp32")) for s in (plain, mid, big)}
    keys.add(store_key(store_fields(resolve("lite0+gem"), "avg", "fp32")))
    assert len(keys) == 4

    paths = _images(flowers_small, 3)
    f = extract(paths, [plain, mid, big], cache=FeatureCache(cache_dir), engine="torch")
    a, m, b = (f.blocks[s.name][:, 0] for s in (plain, mid, big))
    assert m.shape == (3, 1712) and a.shape == b.shape == (3, 1280)
    assert not np.allclose(a, b, atol=1e-3)  # a larger input is other features
    # GeM of a non-negative map lies between its mean and its max
    assert (m[:, :1280] >= a - 1e-4).all() and not np.allclose(m[:, :1280], a, atol=1e-3)


def test_readout_engines_agree(flowers_small, cache_dir):
    pytest.importorskip("openvino")
    spec = resolve("lite0@240+avgmax+mid1")
    paths = _images(flowers_small, 4)
    out = {}
    for engine in ("torch", "openvino"):
        c = FeatureCache(str(Path(cache_dir).parent / f"agree-{engine}"))
        out[engine] = extract(paths, [spec], cache=c, engine=engine, device="cpu").blocks[spec.name]
    assert out["torch"].shape == (4, 1, 1280 + 320)
    np.testing.assert_allclose(out["torch"], out["openvino"], atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def readout_model(flowers_small, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("readout") / "model"
    rc = main(["train", str(flowers_small), "--out", str(out), "--backbones",
               "lite0@256+gem+mid2", "--folds", "2", "--cache", cache_dir, "-q"])  # fmt: skip
    assert rc == 0
    return out


def test_readout_model_records_and_predicts_the_same_everywhere(
    readout_model, flowers_small, cache_dir, tmp_path, capsys
):
    manifest = json.loads((readout_model / "manifest.json").read_text())
    bb = manifest["backbones"][0]
    assert bb["name"] == "lite0@256+gem+mid2" and bb["readout"] == "gem+mid2"
    assert bb["feature_dim"] == 1712 and bb["preprocess"]["input_size"] == 256

    model = load_model(str(readout_model), cache_dir=cache_dir)
    paths = _images(flowers_small)[::3]
    proba = model.predict_proba(paths)  # through the feature cache
    assert model.score(paths, [Path(p).parent.name for p in paths]) >= 0.75
    # the fixed-size contract (engines without the cache) gives the same probabilities
    from stackvision.export import export_onnx, prepare_images

    batch = prepare_images(paths, model)
    assert batch.shape[1] == 256
    np.testing.assert_allclose(model.forward_uint8(batch), proba, atol=1e-4, rtol=0)
    # the ONNX export carries the readout: ONNX Runtime alone gives the same probabilities
    pytest.importorskip("onnxruntime")
    export_onnx(model, str(tmp_path / "m.onnx"), check=False)
    onnx_proba, _ = run_onnx_alone(tmp_path / "m.onnx", batch, tmp_path)
    np.testing.assert_allclose(onnx_proba, proba, atol=1e-4, rtol=0)

    # and the CLI's predict, as a user runs it
    capsys.readouterr()
    rc = main(["predict", str(readout_model), *paths, "--format", "kaggle", "--cache", cache_dir,
               "-q"])  # fmt: skip
    assert rc == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0][1:] == model.classes_
    got = {r[0]: [float(v) for v in r[1:]] for r in rows[1:]}
    for p, row in zip(paths, proba):
        np.testing.assert_allclose(got[Path(p).stem], row, atol=1e-5)


def test_head_auto_picks_by_inner_cv_and_records_it(flowers_small, cache_dir, tmp_path, capsys):
    out = tmp_path / "auto"
    rc = main(["train", str(flowers_small), "--out", str(out), "--backbones", "lite0",
               "--folds", "2", "--tta", "none", "--head", "auto", "--cache", cache_dir])  # fmt: skip
    assert rc == 0
    said = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    sel = metrics["head_selection"]
    logreg = [r for r in sel["tried"] if r["kind"] == "logreg"]
    (mlp,) = [r for r in sel["tried"] if r["kind"] == "mlp"]
    best = min(logreg, key=lambda r: r["log_loss"])
    mlp_won = mlp["log_loss"] < mlp["logreg_on_same_rows"]["log_loss"]
    assert (sel["kind"], sel["params"]) == (("mlp", {}) if mlp_won else ("logreg", best["params"]))
    assert len([r for r in sel["tried"] if r["kind"] == "logreg"]) >= 2
    assert f"head auto: {sel['kind']}" in said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head"]["kind"] == sel["kind"] and manifest["head"]["selected_by"] == "auto"
    assert load_model(str(out), cache_dir=cache_dir).head == sel["kind"]


def test_select_head_prefers_a_larger_c_on_separable_features(flowers_small, cache_dir):
    listing = from_folder(str(flowers_small))
    model = StackedClassifier(["lite0"], tta="none", folds=2, runtime=Runtime(cache_dir))
    model.fit(listing.paths, listing.labels)
    X, y = model._features_cache.stacked(), model._feature_y
    sel = select_head(X, y, 3, mlp=False)
    cs = [r["params"]["C"] for r in sel["tried"]]
    assert sel["kind"] == "logreg" and sel["params"]["C"] in cs and len(cs) >= 2
    # shuffled labels: nothing to learn, so the chosen head is no better than chance
    rng = np.random.default_rng(0)
    noise = select_head(X, rng.permutation(y), 3, mlp=False)
    assert min(r["accuracy"] for r in noise["tried"]) < 0.7


def test_named_stack_and_parse(capsys):
    # the measured default (BENCHMARKS.md, "Better frozen features"): pinned as literal names
    fg = ["lite0@256+gem+mid2", "lite1@272+gem+mid2", "lite2@288+gem+mid2"]
    assert expand_named(["fine-grained"]) == fg == list(FINE_GRAINED)
    assert expand_named(["classic", "lite0@300"]) == ["lite0", "lite1", "lite2", "lite0@300"]
    assert DEFAULT_STACK == FINE_GRAINED  # the default since issue 12's measurements
    assert StackedClassifier().backbones == DEFAULT_STACK
    assert main(["backbones", "fine-grained"]) == 0
    out = capsys.readouterr().out
    assert "lite0@256+gem+mid2" in out and "lite2@288+gem+mid2" in out and " 288 " in out
    assert " 1752 " in out  # lite2: 1280 + 120 + 352
    assert parse_readout("GEM+mid2").text == "gem+mid2" and parse_readout("mid1").text == "avg+mid1"
    for bad in ("lite0@abc", "lite0@16", "lite0+bogus", "lite0+gem+mid9", "lite0+"):
        with pytest.raises(StackvisionError):
            resolve(bad)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--backbones", "lite0@abc"], "lite0@abc"),
        (["--backbones", "lite0@16"], "outside 64..1024"),
        (["--pool", "median"], "median"),
        (["--backbones", "lite0+gem+mid9"], "mid9"),
        (["--head", "auto", "--head-param", "C=0.1"], "--head auto"),
    ],
)
def test_bad_specs_are_one_line_errors(flowers_small, cache_dir, tmp_path, capsys, extra, needle):
    args = ["train", str(flowers_small), "--out", str(tmp_path / "m"), "--cache", cache_dir]
    assert main([*args, "--tta", "none", *extra]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "m").exists()


def test_bad_readout_on_extract_is_a_one_line_error(flowers_small, cache_dir, capsys):
    rc = main(["extract", str(flowers_small), "--backbones", "lite0", "--pool", "gem+midx",
               "--cache", cache_dir])  # fmt: skip
    assert rc == 2
    one_line_error(capsys, "gem+midx")
