"""Combiners that do not overfit with many classes: ``calibrated`` (weights + a temperature per
member) and ``best`` (never below the best member), on held-out rows and through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stackvision import load_model
from stackvision.cli import main
from stackvision.ensemble_combiners import fit_best
from stackvision.ensemble_methods import (
    apply_method,
    combine_calibrated,
    ensemble_module,
    fit_calibrated,
)
from stackvision.heads import softmax
from stackvision.metrics import log_loss


def _members(n=1200, c=40, seed=0):
    """Labels and two members' probabilities: ``sharp`` is right 80% of the time and far too
    sure of itself; ``soft`` is weaker, honest, and errs on other images."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    onehot = np.eye(c)[y]
    wrong = np.eye(c)[(y + rng.integers(1, c, n)) % c]
    right = rng.random(n) < 0.8
    sharp = softmax(12 * np.where(right[:, None], onehot, wrong) + rng.normal(0, 1, (n, c)))
    soft = softmax(2.5 * onehot + rng.normal(0, 1.2, (n, c)))
    return y, np.stack([sharp, soft])


def _halves(y):
    idx = np.arange(len(y))
    return idx[: len(y) // 2], idx[len(y) // 2 :]


def test_calibrated_beats_every_member_on_held_out_rows():
    y, P = _members()
    fit, test = _halves(y)
    w, t = fit_calibrated(P[:, fit], y[fit])
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    _, t_alone = fit_calibrated(P[:1, fit], y[fit])
    assert t_alone[0] > 1.5  # alone, the over-confident member is cooled down
    held = log_loss(y[test], combine_calibrated(P[:, test], (w, t)))
    best_member = min(log_loss(y[test], P[k, test]) for k in range(2))
    assert held < best_member - 0.05
    # the plain weighted mean cannot fix the over-confidence: calibrated does better
    wm = apply_method(
        "weighted", P[:, test], apply_method.__globals__["fit_weights"](P[:, fit], y[fit])
    )
    assert held < log_loss(y[test], wm)


def test_best_falls_back_to_the_best_member_against_a_useless_one():
    rng = np.random.default_rng(1)
    y, P = _members(seed=1)
    noise = rng.dirichlet(np.ones(P.shape[2]), P.shape[1])
    P2 = np.stack([P[1], noise])  # an honest member and pure noise
    fit, test = _halves(y)
    sel = fit_best(P2[:, fit], y[fit], P2.shape[2], names=["good", "noise"])
    assert sel.scores["member:good"] < sel.scores["member:noise"]
    assert "stacked" not in sel.scores  # 40 classes x 2 members: too few rows for a dense layer
    held = log_loss(y[test], apply_method(sel.method, P2[:, test], sel.fitted))
    assert held <= log_loss(y[test], P2[0, test]) + 0.01  # never below the best member
    if sel.name == "member:good":
        assert sel.method == "weighted" and list(sel.fitted) == [1.0, 0.0]


def test_best_picks_a_combiner_when_members_complement_each_other():
    y, P = _members(seed=2)
    fit, test = _halves(y)
    sel = fit_best(P[:, fit], y[fit], P.shape[2], names=["sharp", "soft"])
    assert not sel.name.startswith("member:")
    assert sel.scores[sel.name] == min(sel.scores.values())
    held = log_loss(y[test], apply_method(sel.method, P[:, test], sel.fitted))
    assert held < min(log_loss(y[test], P[k, test]) for k in range(2))


def test_calibrated_torch_module_matches_numpy():
    y, P = _members(n=50, c=6)
    fitted = fit_calibrated(P, y)

    class Fixed(torch.nn.Module):  # a "member" that returns its stored probabilities
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            return x[self.k]

    subs = [(torch.nn.Identity(), Fixed(k)) for k in range(2)]
    cols = [np.arange(6), np.arange(6)]
    mod = ensemble_module(subs, cols, "calibrated", fitted)
    out = mod(torch.as_tensor(P, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(out, combine_calibrated(P, fitted), atol=1e-5)


@pytest.mark.parametrize("method", ["best", "calibrated"])
def test_ensemble_cli_new_methods(stack_dir, ft_dir, heldout, cache_dir, tmp_path, capsys, method):
    out = tmp_path / f"ens-{method}"
    args = ["ensemble", str(stack_dir), str(ft_dir), "--data", str(heldout), "--out", str(out)]
    assert main([*args, "--method", method, "--cache", cache_dir, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    table = json.loads((out / "comparison.json").read_text())
    assert table[-1]["model"] == f"ensemble:{method}" and "out-of-fold" in table[-1]["scored"]
    best_member = min(r["log_loss"] for r in table[:2])
    if method == "best":
        sel = manifest["selection"]
        assert sel["by"] == "best" and f"best: {sel['chosen']}" in printed
        assert sel["oof_log_loss"][sel["chosen"]] == min(sel["oof_log_loss"].values())
        assert sel["oof_log_loss"][sel["chosen"]] <= best_member + 1e-9
        assert manifest["method"] in ("weighted", "calibrated", "mean", "stacked")
    else:
        assert (
            manifest["method"] == "calibrated" and len(manifest["calibrated"]["temperatures"]) == 2
        )
    paths = sorted(str(p) for p in heldout.rglob("*.jpg"))
    ens = load_model(str(out), cache_dir=cache_dir, device="cpu")
    proba = ens.predict_proba(paths)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    P = ens.member_probas(paths)[1]
    np.testing.assert_allclose(
        proba, apply_method(ens.method_, P, ens.fitted_[ens.method_]), atol=1e-6
    )


def test_damaged_calibrated_tensors_are_refused(stack_dir, ft_dir, heldout, cache_dir, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from stackvision.errors import StackvisionError

    out = tmp_path / "ens"
    args = ["ensemble", str(stack_dir), str(ft_dir), "--data", str(heldout), "--out", str(out)]
    assert main([*args, "--method", "calibrated", "--cache", cache_dir, "-q"]) == 0
    for name, value, message in [
        ("calibrated.t", np.array([1.0, -1.0], np.float32), "temperatures > 0"),
        ("calibrated.w", np.ones(3, np.float32), "tensor 'calibrated.w' has shape (3,)"),
    ]:
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(out, bad)
        path = bad / "weights.safetensors"
        t = dict(load_file(str(path)))
        t[name] = value
        save_file(t, str(path))
        with pytest.raises(StackvisionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_model(str(bad), cache_dir=cache_dir, device="cpu")
