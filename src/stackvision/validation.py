"""Splits, k-fold training with out-of-fold predictions, flip-TTA averaging and calibration.

Features arrive as ``X`` of shape (N, n_views, D). Splits are made on images, never on views, so an
image and its flip are always on the same side. With TTA, training rows are every view of every
training image, and a prediction is the mean of the per-view probabilities.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import StackvisionError
from .heads import balanced_weights, make_head, softmax

TTA_MODES = ("none", "flip")  # flip: the original and the horizontally flipped image


def _on_groups(split, y: np.ndarray, groups) -> list[tuple[np.ndarray, np.ndarray]]:
    """``split(y_of_groups)`` made on one row per group (ids 0..G-1, in order of first
    appearance), each side then widened to every row of its groups: identical images never sit on
    both sides. Without repeated groups this is ``split(y)`` itself."""
    groups = None if groups is None else np.asarray(groups)
    if groups is None or len(np.unique(groups)) == len(groups):
        return split(y)
    first = np.unique(groups, return_index=True)[1]
    return [
        (np.flatnonzero(np.isin(groups, tr)), np.flatnonzero(np.isin(groups, va)))
        for tr, va in split(y[first])
    ]


def kfold_splits(
    y: np.ndarray, k: int, seed: int = 0, groups=None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold on images; ``groups`` (equal for identical bytes) stay on one side."""
    from sklearn.model_selection import StratifiedKFold

    def split(yy):
        if len(yy) < k:
            raise StackvisionError(
                f"only {len(yy)} distinct images (after merging identical copies) for --folds {k}",
                f"use --folds {len(yy)} or fewer, or add images" if len(yy) >= 2 else "add images",
            )
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # a class with fewer distinct images than folds
            warnings.simplefilter("ignore", UserWarning)
            return list(skf.split(np.zeros(len(yy)), yy))

    return _on_groups(split, np.asarray(y), groups)


def holdout_split(
    y: np.ndarray, fraction: float, seed: int = 0, groups=None
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified hold-out of about ``fraction`` of the images (of the groups, with ``groups``)."""
    from sklearn.model_selection import StratifiedShuffleSplit

    def split(yy):
        n_classes = len(np.unique(yy))
        n_val = max(n_classes, int(round(fraction * len(yy))))
        sss = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
        return [next(sss.split(np.zeros(len(yy)), yy))]

    return _on_groups(split, np.asarray(y), groups)[0]


def _rows(X: np.ndarray, idx: np.ndarray, n_views: int) -> np.ndarray:
    return X[idx, :n_views].reshape(-1, X.shape[-1])


#: how a stack averages its fold heads and views: ``logits`` (the softmax of the mean logit, what
#: ``fit`` does) or ``proba`` (the mean probability: models of format version 1, whose
#: temperature was fitted to it). The default stack, 5 folds, flip: about the same accuracy, log
#: loss cub86 0.2444 -> 0.2434, flowers5 0.5589 -> 0.5451, imagewoof 0.1277 -> 0.1247
#: (BENCHMARKS.md, "Averaging fold heads and views as logits").
AVERAGING = ("logits", "proba")


def _view_logits(head, X: np.ndarray, n_views: int) -> np.ndarray:
    n, _, d = X.shape
    return head.decision_function(X[:, :n_views].reshape(-1, d)).reshape(n, n_views, -1)


def predict_views(head, X: np.ndarray, n_views: int, averaging: str = "logits") -> np.ndarray:
    """One head over the first ``n_views`` views of ``X``: (N, C) probabilities, averaged as
    ``averaging`` says (:data:`AVERAGING`)."""
    if averaging == "logits":
        return softmax(_view_logits(head, X, n_views).mean(axis=1))
    n, _, d = X.shape
    p = head.predict_proba(X[:, :n_views].reshape(-1, d))
    return p.reshape(n, n_views, -1).mean(axis=1)


@dataclass
class FoldResult:
    heads: list = field(default_factory=list)
    oof_proba: np.ndarray | None = None  # (N, C) for k-fold; val rows only for a hold-out
    oof_index: np.ndarray | None = None  # rows of X that oof_proba covers
    histories: list[list[dict]] = field(default_factory=list)


def fit_head(kind, params, X, y, n_classes, train_idx, val_idx, n_views, class_weight=None, seed=0):
    """Fit one head on ``train_idx`` (all used views), validating on ``val_idx`` (view-averaged)."""
    Xtr = _rows(X, train_idx, n_views)
    ytr = np.repeat(y[train_idx], n_views)
    sw = None
    if class_weight == "balanced":
        sw = balanced_weights(ytr, n_classes)[ytr]
    Xv = X[val_idx, 0] if val_idx is not None and len(val_idx) else None
    yv = y[val_idx] if Xv is not None else None
    head = make_head(kind, params)
    head.fit(Xtr, ytr, n_classes, Xv, yv, sample_weight=sw, seed=seed)
    return head


def cross_validate(
    kind,
    params,
    X,
    y,
    n_classes,
    splits,
    n_views,
    class_weight=None,
    seed=0,
    progress=False,
    fit_views=None,
) -> FoldResult:
    """One head per split; out-of-fold probabilities for every validated row. The heads fit on
    the first ``fit_views`` views of their rows (default ``n_views``), the scores use
    ``n_views``."""  # fmt: skip
    from .progress import progress as progress_bar

    res = FoldResult()
    bar = progress_bar(len(splits), f"{kind} heads", "fold", progress)
    for fi, (tr, va) in enumerate(splits):
        head = fit_head(
            kind,
            params,
            X,
            y,
            n_classes,
            tr,
            va,
            fit_views or n_views,
            class_weight,
            seed + fi,
        )
        res.heads.append(head)
        res.histories.append(head.history)
        bar.update(1)
    bar.close()
    res.oof_proba, res.oof_index = out_of_fold(res.heads, X, splits, n_views, n_classes)
    return res


def out_of_fold(heads, X, splits, n_views, n_classes) -> tuple[np.ndarray, np.ndarray]:
    """(each validated row's probabilities from its fold's head, the rows of ``X`` they are)."""
    proba = np.zeros((len(X), n_classes), np.float64)
    covered = np.zeros(len(X), bool)
    for head, (_, va) in zip(heads, splits):
        proba[va] = predict_views(head, X[va], n_views)
        covered[va] = True
    index = np.flatnonzero(covered)
    return proba[index], index


def fold_scores(y: np.ndarray, proba: np.ndarray, splits, rows=None) -> list[dict]:
    """The headline metrics of each fold's validation rows, ``[{fold, n_images, accuracy,
    top5_accuracy, log_loss, macro_f1}]``, from which the report shows the spread across folds.

    ``y``: labels of every row; ``proba[k]`` are the out-of-fold probabilities of row ``rows[k]``
    (of row ``k`` when ``rows`` is ``None``)."""
    from .metrics import classification_metrics, summary_row

    at = np.full(len(y), -1, np.int64)
    at[np.arange(len(proba)) if rows is None else np.asarray(rows)] = np.arange(len(proba))
    out = []
    for fi, (_tr, va) in enumerate(splits):
        va = np.asarray(va)[at[va] >= 0]
        if not len(va):
            continue
        m = classification_metrics(y[va], proba[at[va]], list(range(proba.shape[1])))
        out.append({"fold": fi + 1, **summary_row(m), "macro_f1": m["macro_f1"]})
    return out


def ensemble_proba(heads, X: np.ndarray, n_views: int, averaging: str = "logits") -> np.ndarray:
    """Every head over every view (K heads x n_views), averaged as ``averaging`` says."""
    if averaging == "logits":
        return softmax(np.mean([_view_logits(h, X, n_views).mean(1) for h in heads], axis=0))
    return np.mean([predict_views(h, X, n_views, "proba") for h in heads], axis=0)


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 1.0:
        return proba
    return softmax(np.log(np.clip(proba, 1e-12, 1.0)) / temperature)


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the log loss of softmax(log p / T) on held-out predictions."""
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(proba, 1e-12, 1.0))

    def nll(log_t):
        q = softmax(logp / np.exp(log_t))
        return -np.mean(np.log(np.clip(q[np.arange(len(y)), y], 1e-12, 1.0)))

    # T < 1 sharpens an under-confident (strongly regularised) head; the floor stops a perfectly
    # separable validation set from driving T to 0 and every later mistake to infinite loss.
    r = minimize_scalar(nll, bounds=(np.log(0.2), np.log(20.0)), method="bounded")
    t = float(np.exp(r.x))
    # Keep T=1 unless calibration really helps: avoids fitting noise on tiny validation sets.
    return t if nll(np.log(t)) < nll(0.0) - 1e-6 else 1.0


@dataclass
class StackFit:
    """What :func:`fit_stack_heads` trained, and what its metrics were computed on.

    ``eval``: (``"train"`` or ``"val"``, rows of that set, labels, calibrated probabilities), or
    ``None`` when nothing was held out.
    """

    heads: list
    histories: list[list[dict]]
    temperature: float
    train_idx: np.ndarray
    splits: list | None = None
    oof_proba: np.ndarray | None = None
    eval: tuple | None = None
    metrics: dict | None = None
    lda: dict | None = None  # how fold_lda weighed the LDA logits (lda_auto), else None


def fit_stack_heads(
    kind,
    params,
    X,
    y,
    classes,
    *,
    folds,
    val_split,
    val,
    n_views,
    class_weight,
    calibrate,
    seed,
    progress=False,
    groups=None,
    lda_auto=False,
    train_views=0,
) -> StackFit:
    """Heads on stacked features ``X`` (N, n_views, D) with labels ``y``, calibrated and scored.

    ``folds >= 2``: one head per fold, out-of-fold metrics (and hold-out metrics of the fold
    ensemble on ``val``, when given). Otherwise one head, early-stopped, calibrated and scored on
    ``val`` = (Xv, yv), or on a ``val_split`` of ``X``; with neither, one head on everything.
    ``groups``: one id per row of ``X``, equal for identical images, which every split keeps on
    one side. ``lda_auto`` (k folds, logreg): the folds' heads get the LDA weight
    :func:`stackvision.lda.fold_lda` chooses on their out-of-fold rows. ``train_views``: the
    last views of ``X`` that only add training rows (:mod:`stackvision.train_views`); every score
    uses the first ``n_views``.
    """
    from .metrics import classification_metrics

    n = len(classes)
    if folds >= 2:
        splits = kfold_splits(y, folds, seed, groups)
        fv = n_views + train_views
        res = cross_validate(
            kind, params, X, y, n, splits, n_views, class_weight, seed, progress, fv
        )
        lda = None
        if lda_auto and kind == "logreg":
            from .lda import fold_lda

            lda = fold_lda(res.heads, X, y, n, splits, n_views, progress, fit_views=fv)
            if lda["lda"]:  # the blended heads' out-of-fold probabilities
                res.oof_proba, _ = out_of_fold(res.heads, X, splits, n_views, n)
        t = fit_temperature(res.oof_proba, y) if calibrate else 1.0
        oof = apply_temperature(res.oof_proba, t)
        out = StackFit(res.heads, res.histories, t, np.arange(len(y)), splits, oof, lda=lda)
        out.eval = ("train", res.oof_index, y[res.oof_index], oof)
        out.metrics = {
            "validation": f"{folds}-fold out-of-fold",
            **classification_metrics(y, oof, classes),
            "folds": fold_scores(y, oof, splits, res.oof_index),
        }
        if val is not None:
            Xv, yv = val
            vp = apply_temperature(ensemble_proba(res.heads, Xv, n_views), t)
            out.metrics["holdout"] = classification_metrics(yv, vp, classes)
            out.eval = ("val", np.arange(len(yv)), yv, vp)
        return out
    tr = np.arange(len(y))
    if val is not None:
        (Xv, yv), where, va = val, "val", np.arange(len(val[1]))
    elif val_split:
        tr, va = holdout_split(y, val_split, seed, groups)
        Xv, yv, where = X[va], y[va], "train"
    else:
        head = fit_head(kind, params, X, y, n, tr, None, n_views + train_views, class_weight, seed)
        return StackFit([head], [head.history], 1.0, tr)
    if Xv.shape[1] < X.shape[1]:  # hold-out rows lack training views; only view 0 is read
        Xv = np.concatenate([Xv, np.repeat(Xv[:, :1], X.shape[1] - Xv.shape[1], axis=1)], 1)
    Xc, yc = np.concatenate([X[tr], Xv]), np.concatenate([y[tr], yv])
    head = fit_head(
        kind, params, Xc, yc, n, np.arange(len(tr)), np.arange(len(tr), len(yc)),
        n_views + train_views, class_weight, seed,
    )  # fmt: skip
    vp = predict_views(head, Xv, n_views)
    t = fit_temperature(vp, yv) if calibrate else 1.0
    vp = apply_temperature(vp, t)
    out = StackFit([head], [head.history], t, tr, eval=(where, va, yv, vp))
    out.metrics = {"validation": "hold-out", **classification_metrics(yv, vp, classes)}
    return out
