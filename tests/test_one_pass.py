"""The one-pass pipeline of ``--decoder torchvision`` (one_pass.py), run on the CPU: the same code
as on CUDA but for ``decode_jpeg``'s device and the CUDA streams."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from stackvision.backbones import resolve
from stackvision.cache import FeatureCache
from stackvision.errors import StackvisionError
from stackvision.extract import extract
from stackvision.gpu_decode import TorchvisionPool

from .serving_helpers import images_of

pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def folder(woof_val, tmp_path_factory):
    """Five real JPEGs, a copy of one under another name, a bad file and a copy of it."""
    d = tmp_path_factory.mktemp("one_pass")
    real = images_of(woof_val)[:5]
    for i, p in enumerate(real):
        shutil.copyfile(p, d / f"{i}.jpg")
    shutil.copyfile(real[2], d / "copy_of_2.jpg")
    (d / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not the rest of a JPEG")
    shutil.copyfile(d / "bad.jpg", d / "copy_of_bad.jpg")
    return sorted(str(p) for p in d.iterdir())


def _by_name(f):
    return {p.rsplit("/", 1)[1]: f.blocks["lite0"][k] for k, p in enumerate(f.paths)}


def test_features_are_the_decoded_crops_through_the_engine(folder, tmp_path):
    """What one pass stores is what decoding the file and running the engine on it gives."""
    from stackvision.engines import create_engine
    from stackvision.gpu_decode import _read

    spec = resolve("lite0")
    f = extract(folder, [spec], views=("orig", "flip"), cache=FeatureCache(str(tmp_path)),
                decoder="torchvision", device="cpu", batch_size=2)  # fmt: skip
    good = [p for p in folder if "bad" not in p]
    assert f.paths == good and f.blocks["lite0"].shape == (6, 2, spec.feature_dim)
    assert f.stats["n_computed"] == 6 and f.stats["n_bad"] == 2 and f.stats["n_cached"] == 0
    assert f.stats["computed_per_backbone"] == {"lite0": 5}  # the copy is computed once
    assert {p.path.rsplit("/", 1)[1] for p in f.problems} == {"bad.jpg", "copy_of_bad.jpg"}
    eng = create_engine(spec, device="cpu", cache_dir=str(tmp_path / "engines"))
    work = [(p, [("lite0", spec.preprocess)]) for p in good]
    crops = TorchvisionPool("cpu").decode_batch(work, [_read(p) for p in good])
    x = np.stack([c["lite0"] for c in crops])
    want = np.stack([eng.features(x), eng.features(np.ascontiguousarray(x[:, :, ::-1]))], 1)
    np.testing.assert_allclose(f.blocks["lite0"], want, atol=1e-4)
    by = _by_name(f)
    assert np.array_equal(by["copy_of_2.jpg"], by["2.jpg"])


def test_each_file_is_read_once_and_a_cached_view_is_not_computed_again(
    folder, tmp_path, monkeypatch
):
    import stackvision.one_pass as op

    reads: list[str] = []
    real = op.read_bytes
    monkeypatch.setattr(op, "read_bytes", lambda p: reads.append(p) or real(p))
    cache = FeatureCache(str(tmp_path))
    spec = resolve("lite0")
    kw = {"cache": cache, "decoder": "torchvision", "device": "cpu", "batch_size": 3}
    first = extract(folder, [spec], views=("orig",), **kw)
    assert sorted(reads) == sorted(folder)  # hashing and decoding share one read
    assert first.stats["n_computed"] == 6 and first.stats["hash_seconds"] == 0.0
    both = extract(folder, [spec], views=("orig", "flip"), **kw)
    assert both.stats["n_cached"] == 0 and both.stats["n_computed"] == 6  # the flip was lacking
    assert np.array_equal(both.blocks["lite0"][:, 0], first.blocks["lite0"][:, 0])
    again = extract(folder, [spec], views=("orig", "flip"), **kw)
    assert again.stats["n_computed"] == 0 and again.stats["n_cached"] == 6
    assert np.array_equal(again.blocks["lite0"], both.blocks["lite0"])


def test_strict_stops_at_the_bad_image_and_keeps_what_was_committed(folder, tmp_path):
    cache = FeatureCache(str(tmp_path))
    spec = resolve("lite0")
    kw = {"cache": cache, "decoder": "torchvision", "device": "cpu", "batch_size": 2}
    order = [p for p in folder if "bad" not in p][:4] + [
        p for p in folder if p.endswith("/bad.jpg")
    ]
    with pytest.raises(StackvisionError, match="bad image .*bad.jpg: .*without --strict"):
        extract(order, [spec], strict=True, **kw)
    after = extract(order[:4], [spec], **kw)
    assert after.stats["n_cached"] == 4 and after.stats["n_computed"] == 0


def test_an_error_in_a_stage_reaches_the_caller_and_no_thread_is_left(
    folder, tmp_path, monkeypatch
):
    import threading

    from stackvision.cache import FeatureStore

    def full_disk(self, items):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureStore, "put_many", full_disk)
    with pytest.raises(OSError, match="No space left"):
        extract(folder, [resolve("lite0")], cache=FeatureCache(str(tmp_path)),
                decoder="torchvision", device="cpu", batch_size=2)  # fmt: skip
    assert _ours(threading.enumerate()) == []


def test_the_torch_engine_takes_a_tensor_as_it_takes_an_array(folder, tmp_path):
    import torch

    from stackvision.engines import create_engine
    from stackvision.images import load_rgb

    spec = resolve("lite0")
    pp = spec.preprocess
    x = np.stack([pp.to_uint8(load_rgb(p, pp.resize_size)) for p in folder[:2]])
    eng = create_engine(spec, engine="torch", device="cpu")
    assert eng.takes_tensors
    assert np.array_equal(eng.features(torch.from_numpy(x)), eng.features(x))


def test_an_interrupted_run_keeps_the_batches_before_it_and_the_next_run_resumes(
    folder, tmp_path, monkeypatch
):
    """Ctrl-C (or any error) in the network stage: what was committed stays; a rerun computes
    only the rest."""
    import threading

    import stackvision.extract as ex

    real = ex.create_engine
    calls = {"n": 0}

    def interrupted_engine(spec, **kw):
        eng = real(spec, **kw)
        features = eng.features

        def stop_on_the_third_batch(x):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return features(x)

        eng.features = stop_on_the_third_batch
        return eng

    monkeypatch.setattr(ex, "create_engine", interrupted_engine)
    cache = FeatureCache(str(tmp_path))
    kw = {"cache": cache, "decoder": "torchvision", "device": "cpu", "batch_size": 2}
    with pytest.raises(KeyboardInterrupt):
        extract(folder, [resolve("lite0")], **kw)
    assert _ours(threading.enumerate()) == []
    monkeypatch.setattr(ex, "create_engine", real)
    again = extract(folder, [resolve("lite0")], **kw)
    # batches [0, 1] and [2, 3] were committed (and 2's copy with them); only 4.jpg is left
    assert again.stats["n_cached"] == 5 and again.stats["n_computed"] == 1


def _ours(threads) -> list[str]:
    """The pipeline's threads still alive (stage threads and readers are named stackvision-*;
    torch and OpenVINO keep executors of their own from import time)."""
    return [t.name for t in threads if t.name.startswith("stackvision-")]
