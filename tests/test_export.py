"""ONNX export: one graph, uint8 images in, probabilities out, checked in ONNX Runtime alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stackvision import StackvisionError, load_model
from stackvision.cli import main
from stackvision.export import (
    export_onnx,
    prepare_image,
    prepare_images,
    resize_matrix,
    resize_uint8,
)

from .conftest import WOOF, WOOF_CLASSES, make_slice
from .serving_helpers import images_of, run_onnx_alone, train_tiny

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_model(woof_train, cache_dir, tmp_path_factory):
    return train_tiny(woof_train, cache_dir, tmp_path_factory.mktemp("export") / "model")


def test_cli_export_runs_in_onnxruntime_alone_and_matches_predict(
    tiny_model, woof_val, cache_dir, tmp_path, capsys
):
    out = tmp_path / "model.onnx"
    assert main(["export", str(tiny_model), "--format", "onnx", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "wrote" in said and "uint8 (N, 224, 224, 3)" in said and "max |diff|" in said

    model = load_model(str(tiny_model), cache_dir=cache_dir)
    paths = images_of(woof_val)[::3]
    batch = prepare_images(paths, model)
    assert batch.dtype == np.uint8 and batch.shape == (len(paths), 224, 224, 3)
    proba, info = run_onnx_alone(out, batch, tmp_path)

    assert info["loaded"] == []  # no stackvision, torch or timm in the ONNX Runtime process
    assert info["classes"] == model.classes_ == sorted(WOOF_CLASSES)
    assert info["inputs"][0][:2] == ["image", "tensor(uint8)"]
    assert info["input"]["size"] == 224 and info["input"]["resize_short_side"] == 256
    # A single-size stack: the contract's input is exactly what predict() feeds the backbone.
    np.testing.assert_allclose(proba, model.predict_proba(paths), atol=1e-4, rtol=0)
    np.testing.assert_allclose(proba, model.forward_uint8(batch), atol=1e-4, rtol=0)
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-5)


def test_multi_size_mlp_stack_exports_and_matches(cache_dir, tmp_path_factory, tmp_path):
    # lite0 (224) + lite1 (240), an MLP head and temperature: in-graph resize, MLP layers, T.
    data = make_slice(tmp_path_factory.mktemp("woof-3"), WOOF / "train", WOOF_CLASSES[:3], 4)
    path = train_tiny(
        data,
        cache_dir,
        tmp_path / "model2",
        backbones=("lite0", "lite1"),
        head="mlp",
        head_params={"hidden": 16, "epochs": 3, "patience": 1},
    )
    model = load_model(str(path), cache_dir=cache_dir)
    assert model.input_preprocess().input_size == 240
    info = export_onnx(model, str(tmp_path / "m2.onnx"), check=False)
    assert info["input"]["size"] == 240
    paths = images_of(data)[::4]
    batch = prepare_images(paths, model)
    proba, meta = run_onnx_alone(tmp_path / "m2.onnx", batch, tmp_path)
    np.testing.assert_allclose(proba, model.forward_uint8(batch), atol=1e-4, rtol=0)
    assert meta["classes"] == model.classes_


def test_resize_is_antialiased_and_exact_on_flat_images():
    m = resize_matrix(260, 224)
    np.testing.assert_allclose(m.sum(axis=1), 1, atol=1e-9)
    flat = np.full((1, 260, 260, 3), 137, np.uint8)
    assert (resize_uint8(flat, 224) == 137).all()
    same = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(1, 8, 8, 3)
    assert resize_uint8(same, 8) is same


def test_prepare_image_from_path_bytes_and_pil_agree(woof_val, tiny_model, cache_dir):
    from PIL import Image

    model = load_model(str(tiny_model), cache_dir=cache_dir)
    path = images_of(woof_val)[0]
    a = prepare_image(path, model)
    b = prepare_image(Path(path).read_bytes(), model)
    assert a.shape == (224, 224, 3) and (a == b).all()
    c = prepare_image(Image.open(path).convert("RGB"), model.input_preprocess())
    assert c.shape == a.shape  # full decode instead of JPEG draft: close, not bit-equal
    assert np.abs(c.astype(int) - a.astype(int)).mean() < 8


def test_export_user_errors(tiny_model, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["export", str(tiny_model), "--out", str(tmp_path)]) == 2
    assert "is an existing folder" in capsys.readouterr().err
    with pytest.raises(StackvisionError, match="cannot be exported"):
        export_onnx(object(), str(tmp_path / "x.onnx"))
    with pytest.raises(StackvisionError, match="uint8 batch of shape"):
        load_model(str(tiny_model)).forward_uint8(np.zeros((1, 100, 100, 3), np.uint8))


@pytest.mark.parametrize("fixture", ["stack_dir", "ft_dir", "ens_dir"])
def test_an_empty_batch_gives_zero_rows_of_probabilities(fixture, request, cache_dir, tmp_path):
    import onnxruntime as ort

    model = load_model(str(request.getfixturevalue(fixture)), cache_dir=cache_dir)
    out = tmp_path / "model.onnx"
    export_onnx(model, str(out), check=False)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    size = model.input_preprocess().input_size
    for n in (0, 1, 3):
        batch = np.zeros((n, size, size, 3), np.uint8)
        (proba,) = sess.run(None, {sess.get_inputs()[0].name: batch})
        assert proba.shape == (n, len(model.classes_))
