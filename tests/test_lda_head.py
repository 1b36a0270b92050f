"""The shrinkage-LDA component of the logreg head (heads.shrinkage_lda, head_select.choose_lda)."""

from __future__ import annotations

import numpy as np
import pytest

from stackvision import Runtime, StackedClassifier
from stackvision.head_select import choose_lda
from stackvision.heads import LogRegHead, shrinkage_lda

from .conftest import labelled_jpegs


def _gaussians(n=40, d=6, k=3, seed=0):
    """k classes sharing one strongly correlated covariance: LDA's own model."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(3, 0.1, d)
    means = rng.normal(scale=1.5, size=(k, d))
    y = np.repeat(np.arange(k), n)
    return (means[y] + rng.normal(size=(len(y), d)) @ mix).astype(np.float32), y


def test_full_shrinkage_is_the_nearest_class_mean_and_an_unseen_class_is_never_picked():
    X, y = _gaussians()
    w, b = shrinkage_lda(X, y, 4, shrinkage=1.0)  # class 3 has no row
    means = np.stack([X[y == c].mean(0) for c in range(3)])
    centred = X - means[y]
    mu = (centred**2).sum() / (len(X) - 4) / X.shape[1]  # mean of the covariance's diagonal
    np.testing.assert_allclose(w[:3], means / mu, rtol=1e-4)
    np.testing.assert_allclose(b[:3], -0.5 * (means**2).sum(1) / mu, rtol=1e-4)
    assert (w[3] == 0).all() and ((X @ w.T + b).argmax(1) != 3).all()
    # with the covariance it models, LDA separates the classes far better than chance
    w, b = shrinkage_lda(X, y, 3, shrinkage=0.1)
    assert ((X @ w.T + b).argmax(1) == y).mean() > 0.9


def test_the_head_adds_the_weighted_lda_logits_to_the_logistic_regressions():
    X, y = _gaussians()
    plain = LogRegHead().fit(X, y, 3)
    blended = LogRegHead(lda=0.25).fit(X, y, 3)
    w, b = shrinkage_lda(plain._scale(X), y, 3)
    want = plain.decision_function(X) + 0.25 * (plain._scale(X) @ w.T + b)
    np.testing.assert_allclose(blended.decision_function(X), want, rtol=1e-4, atol=1e-4)
    assert set(blended.state()) == {"mean", "scale", "weight", "bias"}  # one linear layer
    with pytest.raises(Exception, match="lda"):
        LogRegHead(lda=-1.0)


def test_choose_lda_keeps_the_blend_only_when_its_inner_cv_log_loss_is_lower(woof_train, cache_dir):
    X, y = labelled_jpegs(woof_train)
    model = StackedClassifier(["lite0"], folds=2, tta="flip", runtime=Runtime(cache_dir))
    feats = model.fit(X, y)._features(X)
    yk = np.asarray([model.classes_.index(y[i]) for i in feats.index])
    got = choose_lda(feats.stacked(), yk, len(model.classes_), 0.02, n_views=2)
    loss = got["log_loss"]
    assert got["weight_tried"] > 0 and set(loss) == {"logreg", "lda", "blend"}
    if loss["blend"] < loss["logreg"]:
        assert got["lda"] == got["weight_tried"]
    else:
        assert got["lda"] == 0.0
    # on LDA's own kind of data the blend wins
    Xg, yg = _gaussians(n=60)
    won = choose_lda(np.stack([Xg, Xg], 1), yg, 3, 0.02, n_views=2)
    assert won["lda"] > 0 and won["log_loss"]["blend"] < won["log_loss"]["logreg"]


def test_the_classifier_chooses_the_weight_unless_head_params_fix_it(woof_train, cache_dir):
    from stackvision.heads import shrinkage_lda
    from stackvision.validation import apply_temperature, predict_views

    X, y = labelled_jpegs(woof_train)
    auto = StackedClassifier(["lite0"], folds=2, tta="flip", runtime=Runtime(cache_dir)).fit(X, y)
    got = auto.metrics_["lda"]
    assert auto.head_params_["lda"] == got["lda"] and "2 folds' out-of-fold" in got["criterion"]
    assert all(h.params["lda"] == got["lda"] for h in auto.heads_)
    # k folds: the weight comes from the fold heads' own out-of-fold logits; the reported
    # out-of-fold probabilities are the blended heads'
    feats, yk = auto._features_cache.stacked(), auto._feature_y
    for head, (tr, va) in zip(auto.heads_, auto.splits_):
        plain = LogRegHead().fit(feats[tr].reshape(-1, feats.shape[-1]), np.repeat(yk[tr], 2), 4)
        w, b = shrinkage_lda(plain._scale(feats[tr].reshape(-1, feats.shape[-1])),
                             np.repeat(yk[tr], 2), 4)  # fmt: skip
        rows = feats[va, 0]
        want = plain.decision_function(rows) + got["lda"] * (plain._scale(rows) @ w.T + b)
        np.testing.assert_allclose(head.decision_function(rows), want, rtol=1e-3, atol=1e-3)
        oof = apply_temperature(predict_views(head, feats[va], 2), auto.temperature_)
        np.testing.assert_allclose(auto.oof_proba_[va], oof, atol=1e-6)
    # one head (a hold-out): the weight from an inner 3-fold CV before it is fitted
    held = StackedClassifier(["lite0"], folds=0, val_split=0.25, tta="none",
                             runtime=Runtime(cache_dir)).fit(X, y)  # fmt: skip
    assert "inner" in held.metrics_["lda"]["criterion"]
    assert held.heads_[0].params["lda"] == held.metrics_["lda"]["lda"]
    fixed = StackedClassifier(["lite0"], folds=2, tta="none", head_params={"lda": 0.0},
                              runtime=Runtime(cache_dir)).fit(X, y)  # fmt: skip
    assert "lda" not in fixed.metrics_ and fixed.head_params_ == {"lda": 0.0}
    plain = LogRegHead().fit(*_rows(fixed), len(fixed.classes_))
    np.testing.assert_allclose(fixed.heads_[0].coef_, plain.coef_, atol=1e-5)


def _rows(model):
    """The first fold's training rows of a one-view model, as fit_head gives them to the head."""
    feats, y = model._features_cache, model._feature_y
    tr = model.splits_[0][0]
    return feats.stacked()[tr, 0], y[tr]


def test_through_the_cli_the_weight_is_recorded_and_lda_0_turns_it_off(
    stack_dir, flowers_small, cache_dir, tmp_path
):
    import json

    from .conftest import _cli_train

    def saved(d):
        return (json.loads((d / "manifest.json").read_text())["head"],
                json.loads((d / "metrics.json").read_text()))  # fmt: skip

    head, metrics = saved(stack_dir)  # the default: the weight chosen and recorded
    assert head["kind"] == "logreg" and head["params"]["lda"] == metrics["lda"]["lda"]
    assert set(metrics["lda"]["log_loss"]) == {"logreg", "lda", "blend"}
    off = _cli_train(flowers_small, tmp_path / "off", cache_dir, "--head-param", "lda=0")
    head, metrics = saved(off)
    assert head["params"]["lda"] == 0 and "lda" not in metrics
