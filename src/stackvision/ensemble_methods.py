"""The ensemble's combiners: ``mean``, ``weighted`` (softmax-parametrised member weights fitted
by L-BFGS on log loss), ``calibrated`` (the same weights plus one temperature per member, fitted
jointly: ``sum_k w_k softmax(log p_k / T_k)``; 2K numbers whatever the number of classes, so it
does not overfit with many classes) and ``stacked`` (a multinomial logistic regression on the
members' concatenated log-probabilities), on (K members, N images, C classes) probability
arrays; and the same combination as one torch module for export. See :mod:`stackvision.ensemble`
(and :mod:`stackvision.ensemble_combiners` for ``best``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .heads import LogRegHead, softmax
from .metrics import log_loss

METHODS = ("mean", "weighted", "calibrated", "stacked")
STACKED_C_GRID = (0.01, 0.1, 1.0)
_EPS = 1e-6


# ---------------------------------------------------------------------- combiners (numpy)
def as_array(P: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(p, np.float64) for p in P])  # (K, N, C)


def combine_mean(P: np.ndarray) -> np.ndarray:
    return P.mean(axis=0)


def combine_weighted(P: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.tensordot(w, P, axes=1)


def fit_weights(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Member weights (softmax-parametrised, so positive and summing to 1) minimising log loss."""
    from scipy.optimize import minimize

    K = P.shape[0]
    py = np.clip(P[:, np.arange(len(y)), y], 1e-15, 1.0)  # (K, N): each member's p(true class)

    def f(a):
        w = softmax(a[None])[0]
        mix = np.clip(w @ py, 1e-15, None)
        loss = -np.mean(np.log(mix))
        # d loss / d w_k = -mean(py_k / mix); chain rule through the softmax.
        gw = -np.mean(py / mix, axis=1)
        ga = w * (gw - w @ gw)
        return loss, ga

    r = minimize(f, np.zeros(K), jac=True, method="L-BFGS-B")
    return softmax(r.x[None])[0]


def _tempered(P, t):
    """Each member's probabilities at temperature ``t`` (K,): softmax(log p / t), torch."""
    import torch

    return torch.softmax(torch.log(torch.clamp(P, min=1e-12)) / t.view(-1, 1, 1), dim=2)


def fit_calibrated(P: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(member weights (K,), member temperatures (K,)) minimising the log loss of
    ``sum_k w_k softmax(log P_k / T_k)`` (weights softmax-, temperatures log-parametrised;
    temperatures kept in [0.05, 20]). L-BFGS from equal weights and T = 1."""
    import torch

    Pt = torch.as_tensor(np.asarray(P, np.float64))
    yt = torch.as_tensor(np.asarray(y, np.int64))
    a = torch.zeros(P.shape[0], dtype=torch.float64, requires_grad=True)
    lt = torch.zeros(P.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, lt], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        t = torch.exp(torch.clamp(lt, np.log(0.05), np.log(20.0)))
        mix = torch.einsum("k,knc->nc", torch.softmax(a, 0), _tempered(Pt, t))
        loss = -torch.log(torch.clamp(mix[torch.arange(len(yt)), yt], min=1e-15)).mean()
        loss.backward()
        return loss

    opt.step(closure)
    t = torch.exp(torch.clamp(lt, np.log(0.05), np.log(20.0)))
    return torch.softmax(a, 0).detach().numpy(), t.detach().numpy()


def combine_calibrated(P: np.ndarray, fitted) -> np.ndarray:
    import torch

    w, t = (torch.as_tensor(np.asarray(v, np.float64)) for v in fitted)
    mix = torch.einsum("k,knc->nc", w, _tempered(torch.as_tensor(np.asarray(P, np.float64)), t))
    return mix.numpy()


def _stack_inputs(P: np.ndarray) -> np.ndarray:
    K, N, C = P.shape
    return np.log(np.clip(P, _EPS, 1.0)).transpose(1, 0, 2).reshape(N, K * C).astype(np.float32)


def fit_stacked(P: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> LogRegHead:
    """The dense-layer combiner on concatenated log-probabilities; C by inner 3-fold CV."""
    from .validation import kfold_splits

    Z = _stack_inputs(P)
    counts = np.bincount(y, minlength=n_classes)
    best_c = STACKED_C_GRID[len(STACKED_C_GRID) // 2]
    k = int(min(3, counts[counts > 0].min()))
    if k >= 2 and len(STACKED_C_GRID) > 1:
        splits = kfold_splits(y, k, seed)
        scores = []
        for c in STACKED_C_GRID:
            oof = np.zeros((len(y), n_classes))
            for tr, va in splits:
                h = LogRegHead(C=c, max_iter=500).fit(Z[tr], y[tr], n_classes)
                oof[va] = h.predict_proba(Z[va])
            scores.append(log_loss(y, oof))
        best_c = STACKED_C_GRID[int(np.argmin(scores))]
    return LogRegHead(C=best_c, max_iter=500).fit(Z, y, n_classes)


def combine_stacked(P: np.ndarray, head: LogRegHead) -> np.ndarray:
    return head.predict_proba(_stack_inputs(P)).astype(np.float64)


def fit_method(method: str, P: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0):
    """What ``method`` learns from member probabilities ``P`` and labels ``y`` (None for mean)."""
    if method == "mean":
        return None
    if method == "weighted":
        return fit_weights(P, y)
    if method == "calibrated":
        return fit_calibrated(P, y)
    return fit_stacked(P, y, n_classes, seed)


def apply_method(method: str, P: np.ndarray, fitted) -> np.ndarray:
    """Combined probabilities of ``method`` with what :func:`fit_method` learned."""
    if method == "mean":
        return combine_mean(P)
    if method == "weighted":
        return combine_weighted(P, fitted)
    if method == "calibrated":
        return combine_calibrated(P, fitted)
    return combine_stacked(P, fitted)


def ensemble_module(subs, columns, method: str, fitted):
    """The torch module of an ensemble: ``subs`` = [(resize module, member module)], each
    member's ``columns`` in the ensemble's class order, the combiner of ``method``."""
    import torch
    import torch.nn as nn

    class EnsembleModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.resizes = nn.ModuleList([r for r, _ in subs])
            self.members = nn.ModuleList([m for _, m in subs])
            for k, c in enumerate(columns):
                self.register_buffer(f"cols{k}", torch.as_tensor(c, dtype=torch.long))
            if method == "weighted":
                self.register_buffer("w", torch.as_tensor(fitted, dtype=torch.float32))
            if method == "calibrated":
                self.register_buffer("w", torch.as_tensor(fitted[0], dtype=torch.float32))
                self.register_buffer("t", torch.as_tensor(fitted[1], dtype=torch.float32))
            if method == "stacked":
                self.register_buffer("mean", torch.as_tensor(fitted.mean_))
                self.register_buffer("scale", torch.as_tensor(fitted.scale_))
                self.register_buffer("W", torch.as_tensor(fitted.coef_))
                self.register_buffer("b", torch.as_tensor(fitted.intercept_))

        def forward(self, x):
            P = torch.stack(
                [
                    m(r(x))[:, self.get_buffer(f"cols{k}")]
                    for k, (r, m) in enumerate(zip(self.resizes, self.members))
                ]
            )
            if method == "mean":
                return P.mean(0)
            if method == "weighted":
                return (self.w.view(-1, 1, 1) * P).sum(0)
            if method == "calibrated":
                return (self.w.view(-1, 1, 1) * _tempered(P, self.t)).sum(0)
            z = torch.log(torch.clamp(P, _EPS, 1.0)).permute(1, 0, 2).flatten(1)
            return torch.softmax(((z - self.mean) / self.scale) @ self.W.T + self.b, dim=1)

    return EnsembleModule().eval()
