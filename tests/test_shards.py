"""Sharded feature sets and streaming heads: generated feature files, plus one real export."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from stackvision.errors import StackvisionError
from stackvision.shards import ShardedFeatures, ShardWriter
from stackvision.streaming import train_from_shards

VIEWS = ("orig", "flip")


def _generated(path, n=1000, dims=(16, 24), rows_per_shard=128, n_classes=4, seed=0, sep=3.0):
    """Write ``n`` rows of class-dependent Gaussian features in uneven add() calls."""
    rng = np.random.default_rng(seed)
    names = ["lite0", "lite1"][: len(dims)]
    centres = {
        b: rng.normal(0, sep, (n_classes, d)).astype(np.float32) for b, d in zip(names, dims)
    }
    y = rng.integers(0, n_classes, n)
    blocks = {
        b: (centres[b][y][:, None, :] + rng.normal(0, 1, (n, len(VIEWS), d))).astype(np.float32)
        for b, d in zip(names, dims)
    }
    hashes = [f"{i:032x}" for i in range(n)]
    w = ShardWriter(
        str(path),
        [{"name": b, "dim": d} for b, d in zip(names, dims)],
        VIEWS,
        classes=[f"c{k}" for k in range(n_classes)],
        rows_per_shard=rows_per_shard,
        meta={"pool": "avg"},
    )
    cuts = [0, 7, 300, 301, 777, n]
    for a, b in zip(cuts[:-1], cuts[1:]):
        w.add(hashes[a:b], {k: v[a:b] for k, v in blocks.items()}, y[a:b])
    w.close()
    return np.concatenate([blocks[b] for b in names], axis=-1), y, hashes


def test_roundtrip_mmap_take_and_chunks(tmp_path):
    X, y, hashes = _generated(tmp_path / "s")
    f = ShardedFeatures(str(tmp_path / "s"))
    assert f.shape == X.shape and f.n_shards == 8  # 1000 rows / 128
    assert [s["rows"] for s in f.index["shards"]] == [128] * 7 + [104]
    assert np.array_equal(f.to_array(), X)
    assert np.array_equal(f.labels(), y) and f.hashes() == hashes
    # The files are memory maps, not arrays read into RAM.
    assert isinstance(f._mmaps(0)[0][0], np.memmap)
    rows = np.random.default_rng(1).choice(len(X), 300, replace=False)
    assert np.array_equal(f.take(rows), X[rows])
    # Block-shuffled chunks cover the requested rows exactly once, a chunk from one shard.
    seen = []
    for ids, x in f.chunks(rows, chunk_rows=50, rng=np.random.default_rng(0)):
        assert len(ids) <= 50 and len(np.unique(np.searchsorted(f.starts, ids, "right"))) == 1
        assert np.array_equal(x, X[ids])
        seen += ids.tolist()
    assert sorted(seen) == sorted(rows.tolist())


def test_incomplete_or_existing_sets_are_refused(tmp_path):
    _generated(tmp_path / "s", n=50)
    with pytest.raises(StackvisionError, match="already holds"):
        ShardWriter(str(tmp_path / "s"), [{"name": "lite0", "dim": 4}], VIEWS)
    os.remove(tmp_path / "s" / "index.json")  # an interrupted export has no index
    with pytest.raises(StackvisionError, match="index.json missing"):
        ShardedFeatures(str(tmp_path / "s"))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(StackvisionError, match="not stackvision-shards-v1"):
        ShardedFeatures(str(tmp_path / "t"))


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_streaming_head_trains_chunk_by_chunk(tmp_path, head, monkeypatch, one_torch_thread):
    from stackvision.heads import make_head
    from stackvision.validation import holdout_split

    X, y, _ = _generated(tmp_path / "s", n=800, dims=(1280,), sep=0.2)
    biggest = []
    real_take = ShardedFeatures.take

    def take(self, rows):
        biggest.append(len(rows))
        return real_take(self, rows)

    monkeypatch.setattr(ShardedFeatures, "take", take)
    monkeypatch.setattr(ShardedFeatures, "to_array", None)  # never the whole matrix
    params = {"chunk_rows": 200, "epochs": 6, **({"hidden": 64} if head == "mlp" else {})}
    model = train_from_shards(str(tmp_path / "s"), head=head, head_params=params, val_split=0.2)
    assert max(biggest) <= 200
    acc = model.metrics_["accuracy"]
    # The same data in memory with the in-memory head, same hold-out: streaming is as good.
    tr, va = holdout_split(y, 0.2, 0)
    ref = make_head("logreg", {"max_iter": 100}).fit(
        X[tr].reshape(-1, X.shape[-1]), np.repeat(y[tr], 2), 4
    )
    ref_acc = np.mean(ref.predict_proba(X[va, 0]).argmax(1) == y[va])
    assert acc >= ref_acc - 0.05 and acc > 0.6, (acc, ref_acc)

    # Saved like any model: same manifest, loads, and predicts from stacked features.
    out = model.save(str(tmp_path / "model"))
    from stackvision.classifier import StackedClassifier

    loaded = StackedClassifier.load(out)
    p = loaded.predict_features(X[va[:20]])
    assert np.allclose(p, model.predict_features(X[va[:20]]), atol=1e-6)
    assert loaded.tta == "flip" and loaded.classes_ == ["c0", "c1", "c2", "c3"]


def test_export_from_cache_and_cli_train_from_shards(woof_val, cache_dir, tmp_path, capsys):
    from stackvision.backbones import resolve
    from stackvision.cache import FeatureCache
    from stackvision.cli import main
    from stackvision.extract import extract

    shards = str(tmp_path / "shards")
    common = ["--backbones", "lite0", "--tta", "none", "--cache", cache_dir, "-q"]
    assert (
        main(["extract", str(woof_val), *common, "--export-shards", shards, "--shard-rows", "10"])
        == 0
    )
    assert "24 rows x 1 view(s) x 1280 dims in 3 shard(s)" in capsys.readouterr().out
    f = ShardedFeatures(shards)
    ref = extract(
        sorted(str(p) for p in woof_val.rglob("*.JPEG")),
        [resolve("lite0")],
        cache=FeatureCache(cache_dir),
    )
    assert ref.stats["n_computed"] == 0
    assert f.hashes() == ref.hashes and np.array_equal(f.to_array(), ref.stacked())
    assert f.classes == sorted(os.listdir(woof_val))
    assert np.array_equal(np.bincount(f.labels()), [6, 6, 6, 6])

    model = str(tmp_path / "m")
    args = ["train", "--from-shards", shards, "--out", model, "--val-split", "0.34"]
    assert main([*args, *common[4:], "--head-param", "epochs=3"]) == 0
    assert "streamed 24 rows from 3 shard(s)" in capsys.readouterr().out
    from stackvision.model_dir import read_training_hashes

    seen = read_training_hashes(model)  # the rows its head was fitted on, not the hold-out
    assert seen < set(f.hashes()) and len(seen) == 24 - round(0.34 * 24)
    assert main(["predict", model, str(woof_val), "--cache", cache_dir, "-q"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 25
    assert main([*args, "--folds", "3"]) == 2
    assert main([*args, "--head-param", "bogus=1"]) == 2


def test_train_from_shards_keeps_identical_images_on_one_side(tmp_path, monkeypatch):
    """Rows with one content hash (the same image exported twice) never straddle the hold-out,
    and the same image under two labels is left out, as in k-fold training."""
    import stackvision.streaming as streaming

    X, y, hashes = _generated(tmp_path / "s", n=240, dims=(16,), sep=3.0)
    # 30 images repeated four times each (same hash, same label), then image 0 once more under
    # another label: its five rows are left out.
    idx = np.concatenate([np.arange(30, 240), np.repeat(np.arange(30), 4), [0]])
    lab = np.concatenate([y[idx[:-1]], [(y[0] + 1) % 4]])
    hs = [hashes[i] for i in idx]
    w = ShardWriter(
        str(tmp_path / "d"),
        [{"name": "lite0", "dim": 16}],
        VIEWS,
        classes=[f"c{k}" for k in range(4)],
        rows_per_shard=64,
        meta={"pool": "avg"},
    )
    w.add(hs, {"lite0": X[idx]}, lab)
    w.close()
    seen = {}
    real_fit = streaming.fit_streaming

    def fit(feats, y_, head, params, tr, va, *a, **k):
        seen["tr"], seen["va"] = tr, va
        return real_fit(feats, y_, head, params, tr, va, *a, **k)

    monkeypatch.setattr(streaming, "fit_streaming", fit)
    model = train_from_shards(
        str(tmp_path / "d"), head="logreg", head_params={"epochs": 2}, val_split=0.3, seed=1
    )
    d = model.metrics_["duplicates"]
    assert d["label_conflicts"] == 5 and len(model.problems_) == 5
    assert d["groups"] == 29 and d["extra_copies"] == 29 * 3
    tr, va = seen["tr"], seen["va"]
    conflict = {i for i, h in enumerate(hs) if h == hashes[0]}
    assert not conflict & (set(tr) | set(va))
    assert len(tr) + len(va) == len(idx) - 5
    tr_h, va_h = {hs[i] for i in tr}, {hs[i] for i in va}
    assert not tr_h & va_h  # no image on both sides
    repeated_in_val = {hashes[i] for i in range(1, 30)} & va_h
    assert repeated_in_val  # the test means something: some repeated images were drawn for val
