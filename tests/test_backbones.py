"""The registry, the embedded weights, timm models from a local checkpoint, and offline errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch

from stackvision.backbones import build_model, list_backbones, resolve
from stackvision.errors import StackvisionError
from stackvision.images import load_rgb

from .conftest import WOOF


def test_registry_lists_embedded_and_classic_aliases():
    specs = {s.name: s for s in list_backbones()}
    for name in (
        "lite0",
        "lite1",
        "lite2",
        "xception",
        "inception_v3",
        "densenet121",
        "resnet50v2",
        "inception_resnet_v2",
        "mobilenetv2",
        "vgg16",
    ):
        assert name in specs
    assert [specs[n].preprocess.input_size for n in ("lite0", "lite1", "lite2")] == [224, 240, 260]
    assert specs["lite0"].offline_ready and specs["lite0"].source == "embedded"
    assert specs["inception_v3"].preprocess.input_size == 299
    assert specs["vgg16"].feature_dim == 512


def test_preprocessing_comes_from_the_pretrained_config():
    pp = resolve("lite0").preprocess
    assert (pp.mean, pp.std, pp.interpolation, pp.crop_pct) == (
        (0.5,) * 3,
        (0.5,) * 3,
        "bicubic",
        0.875,
    )
    dn = resolve("densenet121").preprocess
    assert dn.mean == pytest.approx((0.485, 0.456, 0.406))


def test_embedded_lite0_weights_recognise_dogs():
    """The key-order mapping onto timm must give a working ImageNet classifier."""
    spec = resolve("lite0")
    model = timm.create_model(spec.architecture, pretrained=False).eval()
    feat = build_model(spec)
    model.load_state_dict({**model.state_dict(), **feat.state_dict()})
    # the classifier layer comes from the package file (keys _fc.*)
    state = torch.load(spec.weights_path, map_location="cpu", weights_only=True)
    model.classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    files = sorted((WOOF / "val" / "n02099601").iterdir())[:8]  # golden retriever = ImageNet 207
    x = np.stack([spec.preprocess.to_uint8(load_rgb(str(f))) for f in files])
    t = torch.from_numpy(spec.preprocess.normalize(x))
    with torch.no_grad():
        top = model(t).argmax(1).numpy()
    assert (top == 207).mean() >= 0.75


def test_unknown_names_are_user_errors():
    with pytest.raises(StackvisionError, match="unknown backbone 'resnet9000'"):
        resolve("resnet9000")
    with pytest.raises(StackvisionError, match="unknown timm model"):
        resolve("timm:not_a_model_xyz")
    with pytest.raises(StackvisionError, match="weights file .* not found"):
        resolve("timm:resnet10t", weights={"timm:resnet10t": "/nope.pth"})


def test_timm_model_from_a_local_checkpoint(tmp_path):
    ref = timm.create_model("resnet10t", pretrained=False).eval()
    ckpt = tmp_path / "resnet10t.pth"
    torch.save(ref.state_dict(), ckpt)
    spec = resolve("timm:resnet10t", weights={"timm:resnet10t": str(ckpt)})
    assert spec.source == "file" and spec.weights_id.startswith("sha256:")
    model = build_model(spec)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expect = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert torch.allclose(model(x), expect, atol=1e-5)


def test_a_checkpoint_of_another_network_is_refused(tmp_path, caplog):
    """timm loads non-strictly without a classifier and only logs what did not fit: a missing
    weight stays random, an unexpected one belongs to another network. Both are user errors."""
    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "layer4.0.conv2.weight"},
                    r"1 missing weight\(s\), e\.g\. layer4\.0\.conv2\.weight"),
        "unexpected": ({**state, "layer5.0.conv1.weight": torch.zeros(3)},
                       r"1 unexpected weight\(s\), e\.g\. layer5\.0\.conv1\.weight"),
    }  # fmt: skip
    for name, (ckpt, words) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(ckpt, path)
        spec = resolve("timm:resnet10t", weights={"timm:resnet10t": str(path)})
        with pytest.raises(StackvisionError, match=f"{path} .*not a resnet10t checkpoint: {words}"):
            build_model(spec)
    text = tmp_path / "notes.pth"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    spec = resolve("timm:resnet10t", weights={"timm:resnet10t": str(text)})
    with pytest.raises(StackvisionError, match=f"could not load weights .* from {text}"):
        build_model(spec)
    # timm's logger is left as it was
    assert logging.getLogger("timm.models._builder").propagate


def test_offline_without_weights_says_how_to_supply_them(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = resolve("timm:resnet10t.c3_in1k")
    with pytest.raises(StackvisionError, match=r"--weights timm:resnet10t.c3_in1k=PATH"):
        build_model(spec)


def test_pooling_options_change_the_feature():
    spec = resolve("lite0")
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        a, m, am = (build_model(spec, p)(x) for p in ("avg", "max", "avgmax"))
    assert a.shape == m.shape == am.shape == (1, 1280)
    assert torch.allclose(am, (a + m) / 2, atol=1e-5)
    with pytest.raises(StackvisionError, match="unknown pooling"):
        build_model(spec, "median")
