"""The shrinkage-LDA component of the logreg head: how much of it, from out-of-fold logits.

:class:`stackvision.heads.LogRegHead` with ``lda > 0`` adds ``lda`` times the logits of a
shrinkage LDA (:func:`stackvision.heads.shrinkage_lda`) to its own. The two logits live on very
different scales (LDA's temperature was 3 to 50 times the logreg's on the data sets measured), so
the weight is ``T_logreg / T_lda``, temperatures fitted to each one's out-of-fold logits, and it
is kept only if the blend's out-of-fold log loss beats the logreg's. :func:`fold_lda` does it on
the k fold heads a fit already has; :func:`stackvision.head_select.choose_lda` on an inner CV for
a single head.
"""

from __future__ import annotations

import time

import numpy as np

from .progress import say


def logit_temperature(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(T, log loss) of softmax(logits / T), T fitted on these rows; logits (N, n_views, C)
    are averaged over views, as the model does (``validation.AVERAGING``)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    mean = logits.mean(axis=1)

    def nll(log_t):
        lp = log_softmax(mean / np.exp(log_t), axis=-1)
        return float(-lp[np.arange(len(y)), y].mean())

    r = minimize_scalar(nll, bounds=(np.log(0.05), np.log(500.0)), method="bounded")
    return float(np.exp(r.x)), nll(r.x)


def fold_lda(heads, X, y, n_classes, splits, n_views, progress=False, fit_views=None) -> dict:
    """:func:`stackvision.head_select.choose_lda` on the k fold heads already fitted (logreg
    alone): the weight from their out-of-fold logits, and, when kept, each head's weights blended
    in place. One LDA per fold and no extra logistic regression (imagewoof, 2 cores: 57 s of head
    fitting in all, against 87 s with an inner CV first). The weight is one more number chosen
    on the out-of-fold rows, as the temperature is. The LDAs fit on the first ``fit_views``
    views of the rows (default ``n_views``), as the heads did."""
    out, parts = weigh_lda(heads, X, np.asarray(y), n_classes, splits, n_views,
                            f"the {len(splits)} folds' out-of-fold rows", time.perf_counter(),
                            fit_views)  # fmt: skip
    if out["lda"]:
        for head, part in zip(heads, parts):
            head.add_lda(out["lda"], part)
    say_lda(out, progress)
    return out


def weigh_lda(heads, X, y, n_classes, splits, n_views, where, t0, fit_views=None):
    """(the choice, each head's LDA (weights, biases)) from the heads' out-of-fold logits."""
    n, _, d = X.shape
    fv = fit_views or n_views
    lr = np.zeros((n, n_views, n_classes))
    lda = np.zeros_like(lr)
    covered = np.zeros(n, bool)
    parts = []
    for head, (tr, va) in zip(heads, splits):
        w, b = head.lda_part(X[tr, :fv].reshape(-1, d), np.repeat(y[tr], fv), n_classes)
        rows = X[va, :n_views].reshape(-1, d)
        lr[va] = head.decision_function(rows).reshape(len(va), n_views, -1)
        lda[va] = (head._scale(rows) @ w.T + b).reshape(len(va), n_views, -1)
        covered[va] = True
        parts.append((w, b))
    lr, lda, yc = lr[covered], lda[covered], y[covered]
    t_lr, loss_lr = logit_temperature(lr, yc)
    t_lda, loss_lda = logit_temperature(lda, yc)
    weight = t_lr / t_lda
    _, loss_blend = logit_temperature(lr + weight * lda, yc)
    return {
        "lda": round(weight, 6) if loss_blend < loss_lr else 0.0,
        "weight_tried": round(weight, 6),
        "criterion": f"log loss on {where}, each after its own temperature",
        "log_loss": {
            "logreg": round(loss_lr, 5),
            "lda": round(loss_lda, 5),
            "blend": round(loss_blend, 5),
        },  # fmt: skip
        "seconds": round(time.perf_counter() - t0, 2),
    }, parts


def say_lda(out: dict, progress: bool) -> None:
    ll = out["log_loss"]
    say(f"head: logreg + {out['weight_tried']:.3g} x LDA: log loss {ll['blend']:.4f} vs logreg "
        f"{ll['logreg']:.4f} ({out['criterion']}): {'kept' if out['lda'] else 'not kept'} "
        f"({out['seconds']:.0f} s)", progress)  # fmt: skip
