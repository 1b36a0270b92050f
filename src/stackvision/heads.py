"""Classifier heads on stacked features: ``logreg`` and ``mlp``.

A head standardises its input with statistics of its own training rows, so each fold head is
self-contained. State is a flat dict of float32 arrays plus a small JSON-able config, which is what
the model directory stores (safetensors, no pickle).
"""

from __future__ import annotations

import copy
import numbers

import numpy as np

from .errors import StackvisionError
from .params import Interval, check_known, validate_params
from .training import BestWeights, EarlyStopping, ReduceLROnPlateau, TrainingLoop

HEADS = ("logreg", "mlp")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = len(y) / (n_classes * np.maximum(counts, 1))
    return w.astype(np.float32)


class _Head:
    kind = ""
    defaults: dict = {}
    #: parameter -> accepted values (params.py); checked when the head is made, before any work
    constraints: dict = {}

    def __init__(self, **params):
        check_known(params, self.defaults, f"{self.kind} head", "parameter")
        validate_params(self.constraints, params, owner=f"{self.kind} head")
        self.params = {**self.defaults, **params}
        self.history: list[dict] = []
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def _fit_scaler(self, X: np.ndarray) -> None:
        self.mean_ = X.mean(axis=0).astype(np.float32)
        self.scale_ = np.maximum(X.std(axis=0), 1e-6).astype(np.float32)

    def _scale(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean_) / self.scale_).astype(np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(X))

    def config(self) -> dict:
        return {"kind": self.kind, "params": self.params}


class LogRegHead(_Head):
    """Multinomial logistic regression with an L2 penalty, on standardised features.

    Defaults from 5-fold CV on imagewoof/train (lite0+lite1+lite2, flip): C=0.02 beat 0.05 and
    0.1 on log loss; stopping when the loss changes by < 1e-5 (or at 60 iterations) is within
    0.001 log loss of 200 iterations at a quarter of the time (30 s vs 120 s for 5 folds here).
    Same objective as scikit-learn's ``LogisticRegression(C=C)`` (mean loss + ||W||^2 / (2 C n)),
    solved with full-batch L-BFGS in torch: on 3,840-dim stacked features it is an order of
    magnitude faster than scikit-learn's scipy L-BFGS-B here (measured: 8.6 s vs 0.5 s a fold).

    ``lda > 0`` adds ``lda`` times the logits of a shrinkage LDA (:func:`shrinkage_lda`, fitted
    on the same standardised rows) to the weights: still one linear layer, so export and serving
    are unchanged. :class:`~stackvision.StackedClassifier` picks ``lda`` from inner-CV
    temperatures (:func:`stackvision.head_select.choose_lda`).
    """

    kind = "logreg"
    defaults = {"C": 0.02, "max_iter": 60, "lda": 0.0, "lda_shrinkage": 0.5}
    constraints = {
        "C": [Interval(numbers.Real, 0, None, closed="neither")],
        "max_iter": [Interval(numbers.Integral, 1, None)],
        "lda": [Interval(numbers.Real, 0, None, closed="left")],
        "lda_shrinkage": [Interval(numbers.Real, 0, 1, closed="right")],
    }

    def fit(self, X, y, n_classes, X_val=None, y_val=None, sample_weight=None, seed=0):
        import torch
        import torch.nn.functional as F

        self._fit_scaler(X)
        Xt = torch.from_numpy(self._scale(X))
        yt = torch.from_numpy(np.asarray(y, np.int64))
        sw = (
            torch.ones(len(yt))
            if sample_weight is None
            else torch.from_numpy(np.asarray(sample_weight, np.float32))
        )
        lam = 1.0 / (float(self.params["C"]) * float(sw.sum()))
        # No warm start from another fold's head: that head saw this fold's validation rows, and
        # L-BFGS stops before the exact optimum, so the out-of-fold scores would be optimistic.
        W = torch.zeros(X.shape[1], n_classes, requires_grad=True)
        b = torch.zeros(n_classes, requires_grad=True)
        opt = torch.optim.LBFGS(
            [W, b],
            lr=1.0,
            max_iter=int(self.params["max_iter"]),
            history_size=20,
            tolerance_grad=1e-6,
            tolerance_change=1e-5,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = (F.cross_entropy(Xt @ W + b, yt, reduction="none") * sw).sum() / sw.sum()
            loss = loss + 0.5 * lam * (W * W).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.coef_ = W.detach().numpy().T.copy()
        self.intercept_ = b.detach().numpy().copy()
        if self.params["lda"] > 0:
            self.add_lda(self.params["lda"], self.lda_part(X, y, n_classes))
        return self

    def lda_part(self, X, y, n_classes):
        """(weights, biases) of the shrinkage LDA of rows ``X`` (as :meth:`fit` takes them), in
        this head's standardised frame."""
        return shrinkage_lda(self._scale(X), np.asarray(y), n_classes, self.params["lda_shrinkage"])

    def add_lda(self, weight: float, part) -> None:
        """Add ``weight`` times an LDA ``part`` (:meth:`lda_part`) to the weights; the head's
        ``lda`` parameter records it."""
        w, b = part
        self.coef_ = self.coef_ + np.float32(weight) * w
        self.intercept_ = self.intercept_ + np.float32(weight) * b
        self.params["lda"] = weight

    def decision_function(self, X):
        return self._scale(X) @ self.coef_.T + self.intercept_

    def state(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean_,
            "scale": self.scale_,
            "weight": self.coef_,
            "bias": self.intercept_,
        }

    def load_state(self, state):
        self.mean_, self.scale_ = state["mean"], state["scale"]
        self.coef_, self.intercept_ = state["weight"], state["bias"]
        return self


def shrinkage_lda(X: np.ndarray, y: np.ndarray, n_classes: int, shrinkage: float = 0.5):
    """Linear discriminant analysis with a shrunk shared covariance, on standardised rows:
    (weights (C, D), biases (C,)) of its logits, equal class priors.

    The covariance is ``(1 - shrinkage) * S + shrinkage * mean(diag S) * I`` (S: the pooled
    within-class covariance). With ~30 images a class and thousands of features S is singular;
    0.5 was the middle of the flat optimum (0.3-0.7) on cub86, and was then used unchanged on
    flowers5 and imagewoof (BENCHMARKS.md, issue 12). A class with no row gets zero weights.
    """
    X = np.asarray(X, np.float32)
    d = X.shape[1]
    counts = np.bincount(y, minlength=n_classes)
    means = np.zeros((n_classes, d), np.float32)
    np.add.at(means, y, X)
    means /= np.maximum(counts, 1)[:, None]
    centred = X - means[y]
    cov = (centred.T @ centred).astype(np.float64) / max(len(X) - n_classes, 1)
    mu = float(np.trace(cov)) / d
    cov *= 1.0 - shrinkage
    cov[np.diag_indices(d)] += shrinkage * max(mu, 1e-12)
    from scipy.linalg import cho_factor, cho_solve

    w = cho_solve(cho_factor(cov, overwrite_a=True), means.T.astype(np.float64)).T
    w[counts == 0] = 0.0
    b = -0.5 * np.einsum("cd,cd->c", w, means)
    if (counts == 0).any():  # a class this fold never saw: never the LDA's pick
        b[counts == 0] = b[counts > 0].min() - 100.0
    return w.astype(np.float32), b.astype(np.float32)


class MLPHead(_Head):
    """Dense layer(s) with dropout; AdamW, early stopping on validation loss, reduce-LR-on-plateau,
    best weights restored. ``history`` holds one dict per epoch."""

    kind = "mlp"
    defaults = {
        "hidden": 512,
        "dropout": 0.5,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "epochs": 100,
        "batch_size": 128,
        "patience": 8,
        "lr_patience": 3,
        "lr_factor": 0.3,
        "label_smoothing": 0.0,
    }
    constraints = {
        "hidden": [Interval(numbers.Integral, 0, None)],  # 0: no hidden layer
        "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "lr": [Interval(numbers.Real, 0, None, closed="neither")],
        "weight_decay": [Interval(numbers.Real, 0, None)],
        "epochs": [Interval(numbers.Integral, 1, None)],
        "batch_size": [Interval(numbers.Integral, 1, None)],
        "patience": [Interval(numbers.Integral, 1, None)],
        "lr_patience": [Interval(numbers.Integral, 1, None)],
        "lr_factor": [Interval(numbers.Real, 0, 1, closed="neither")],
        "label_smoothing": [Interval(numbers.Real, 0, 1, closed="left")],
    }

    def _net(self, d_in, n_classes):
        import torch.nn as nn

        h = int(self.params["hidden"])
        if h <= 0:
            return nn.Sequential(
                nn.Dropout(float(self.params["dropout"])), nn.Linear(d_in, n_classes)
            )
        return nn.Sequential(
            nn.Dropout(float(self.params["dropout"]) / 2),
            nn.Linear(d_in, h),
            nn.ReLU(),
            nn.Dropout(float(self.params["dropout"])),
            nn.Linear(h, n_classes),
        )

    def fit(self, X, y, n_classes, X_val=None, y_val=None, sample_weight=None, seed=0):
        import torch
        import torch.nn.functional as F

        if X_val is None or len(X_val) == 0:
            raise StackvisionError(
                "the mlp head needs validation data for early stopping",
                "use --folds K, --val-split 0.1 or --val DATA",
            )
        p = self.params
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self._fit_scaler(X)
        Xt, yt = torch.from_numpy(self._scale(X)), torch.from_numpy(y.astype(np.int64))
        Xv, yv = torch.from_numpy(self._scale(X_val)), torch.from_numpy(y_val.astype(np.int64))
        cw = (
            None
            if sample_weight is None
            else torch.from_numpy(np.asarray(sample_weight, np.float32))
        )
        net = self._net(X.shape[1], n_classes)
        opt = torch.optim.AdamW(
            net.parameters(), lr=float(p["lr"]), weight_decay=float(p["weight_decay"])
        )
        bs = int(p["batch_size"])

        def train_epoch(epoch):
            net.train()
            perm = torch.randperm(len(Xt), generator=g)
            tot, correct = 0.0, 0
            for i in range(0, len(perm), bs):
                idx = perm[i : i + bs]
                out = net(Xt[idx])
                loss_each = F.cross_entropy(
                    out, yt[idx], reduction="none", label_smoothing=float(p["label_smoothing"])
                )
                loss = (
                    (loss_each * cw[idx]).sum() / cw[idx].sum()
                    if cw is not None
                    else loss_each.mean()
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss_each.detach().sum())
                correct += int((out.argmax(1) == yt[idx]).sum())
            return {"loss": tot / len(Xt), "accuracy": correct / len(Xt)}

        def validate(epoch):
            net.eval()
            with torch.no_grad():
                vout = net(Xv)
                return {
                    "val_loss": float(F.cross_entropy(vout, yv)),
                    "val_accuracy": float((vout.argmax(1) == yv).float().mean()),
                }

        callbacks = [
            ReduceLROnPlateau(opt, factor=float(p["lr_factor"]), patience=int(p["lr_patience"])),
            BestWeights(lambda: copy.deepcopy(net.state_dict()), net.load_state_dict, 1e-4),
            EarlyStopping(int(p["patience"]), min_delta=1e-4),
        ]
        loop = TrainingLoop(
            train_epoch,
            validate,
            callbacks,
            lr=lambda: opt.param_groups[0]["lr"],
            history=self.history,
        )
        loop.run(int(p["epochs"]))  # ends with the best weights restored
        self._layers = [
            (m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
            for m in net
            if isinstance(m, torch.nn.Linear)
        ]
        self.best_epoch = int(np.argmin([h["val_loss"] for h in self.history])) + 1
        return self

    def decision_function(self, X):
        h = self._scale(X)
        for k, (W, b) in enumerate(self._layers):
            h = h @ W.T + b
            if k < len(self._layers) - 1:
                h = np.maximum(h, 0)
        return h

    def state(self):
        out = {"mean": self.mean_, "scale": self.scale_}
        for k, (W, b) in enumerate(self._layers):
            out[f"layer{k}.weight"], out[f"layer{k}.bias"] = W, b
        return out

    def load_state(self, state):
        self.mean_, self.scale_ = state["mean"], state["scale"]
        n = sum(1 for k in state if k.endswith(".weight"))
        self._layers = [(state[f"layer{k}.weight"], state[f"layer{k}.bias"]) for k in range(n)]
        return self


def make_head(kind: str, params: dict | None = None) -> _Head:
    if kind == "logreg":
        return LogRegHead(**(params or {}))
    if kind == "mlp":
        return MLPHead(**(params or {}))
    raise StackvisionError(f"unknown head '{kind}'", f"use one of: {', '.join(HEADS)}")
