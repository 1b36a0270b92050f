"""How a stack averages its fold heads and views (validation.AVERAGING): the mean logit for
models fitted now, the mean probability for models saved before (no ``averaging`` in the
manifest), the same through predict, forward_uint8 and the exported torch module."""

from __future__ import annotations

import json

import numpy as np
import torch

from stackvision import Runtime, StackedClassifier
from stackvision.cli import main
from stackvision.export import prepare_images
from stackvision.heads import softmax
from stackvision.validation import apply_temperature, ensemble_proba

from .conftest import labelled_jpegs


class _Fixed:
    def __init__(self, logits):
        self.logits = logits

    def decision_function(self, X):
        return self.logits[: len(X)]

    def predict_proba(self, X):
        return softmax(self.decision_function(X))


def test_mean_logit_and_mean_probability_differ_as_they_should():
    # one image, two views, two heads: logits that disagree strongly
    a = np.array([[4.0, 0.0], [0.0, 1.0]])  # head 1: view 1 sure of class 0, view 2 leans 1
    b = np.array([[2.0, 0.0], [0.0, 3.0]])
    X = np.zeros((1, 2, 3))
    heads = [_Fixed(a), _Fixed(b)]
    mean_logit = softmax(((a + b) / 2).mean(0, keepdims=True))
    np.testing.assert_allclose(ensemble_proba(heads, X, 2), mean_logit)
    mean_p = (softmax(a).mean(0) + softmax(b).mean(0)) / 2
    np.testing.assert_allclose(ensemble_proba(heads, X, 2, "proba")[0], mean_p)
    assert not np.allclose(mean_logit[0], mean_p)


def test_a_model_saved_before_keeps_the_mean_probability_everywhere(woof_train, woof_val, cache_dir, tmp_path, capsys):  # fmt: skip
    paths, labels = labelled_jpegs(woof_train)
    rt = Runtime(cache_dir=cache_dir, device="cpu")
    model = StackedClassifier(["lite0"], folds=2, runtime=rt).fit(paths, labels)
    vp = labelled_jpegs(woof_val)[0][::4]
    Xs = model._features(vp).stacked()
    z = np.mean([h.decision_function(Xs.reshape(-1, Xs.shape[-1])).reshape(len(vp), 2, -1).mean(1)
                 for h in model.heads_], axis=0)  # fmt: skip
    expected = apply_temperature(softmax(z), model.temperature_)
    np.testing.assert_allclose(model.predict_paths(vp).proba, expected, atol=1e-6)

    out = model.save(str(tmp_path / "m"))
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["averaging"] == "logits"
    del manifest["averaging"]  # what a model saved before this field looks like: version 1
    manifest["format_version"] = 1
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    old = StackedClassifier.load(out, rt)
    assert old.averaging_ == "proba"
    assert main(["info", out, "--json"]) == 0
    assert '"averaging": "proba"' in capsys.readouterr().out
    p_old = np.mean([h.predict_proba(Xs.reshape(-1, Xs.shape[-1])).reshape(len(vp), 2, -1).mean(1)
                     for h in model.heads_], axis=0)  # fmt: skip
    expected_old = apply_temperature(p_old, model.temperature_)
    np.testing.assert_allclose(old.predict_paths(vp).proba, expected_old, atol=1e-6)
    assert np.abs(np.log(expected_old) - np.log(expected)).max() > 1.0  # the two rules differ
    batch = prepare_images(vp, old)
    np.testing.assert_allclose(old.forward_uint8(batch), expected_old, atol=1e-4)
    for m, want in ((old, expected_old), (model, expected)):  # the module export writes
        with torch.no_grad():
            got = m.to_torch_module()(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)
