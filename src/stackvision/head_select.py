"""``head="auto"``: choose the head (logistic regression's C, or an MLP) on the user's own data.

One constant C was tuned on imagewoof (0.02); on other data the best C differs (on cub86 a larger
C gives a much lower log loss). ``select_head`` runs an inner stratified 3-fold cross-validation on
the cached training features (the rows the final heads are trained on, all views, the same
duplicate groups kept on one side) and scores each candidate by the log loss of its out-of-fold
probabilities after temperature calibration, since the final model is calibrated the same way.

Candidates: logistic regression over :data:`C_GRID`, searched outward from the default C (each
step tries the next C on the side that improved, and stops at the first that does not, so
usually 3-4 of the 7 values are fitted), then the default MLP head, which costs about ten
logreg fits and is therefore tried on the first inner fold only, against the best logreg's
predictions on the same rows. The winner is what ``fit``
trains; the table of what was tried (log loss, accuracy, seconds) goes into ``metrics.json``
(``head_selection``) and the ``train`` summary.

Costs one 3-fold pass per candidate tried (each fold on 2/3 of the rows), on features already in
memory: no image is decoded or pushed through a backbone again.
"""

from __future__ import annotations

import time

import numpy as np

from .heads import LogRegHead, MLPHead
from .lda import say_lda, weigh_lda
from .metrics import log_loss as log_loss_score
from .progress import say
from .validation import (
    apply_temperature,
    cross_validate,
    fit_head,
    fit_temperature,
    kfold_splits,
)

C_GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
INNER_FOLDS = 3


def _calibrated(y, proba) -> tuple[float, float]:
    """(log loss, accuracy) of ``proba`` after a temperature fitted on these rows."""
    proba = apply_temperature(proba, fit_temperature(proba, y))
    return float(log_loss_score(y, proba)), float(np.mean(proba.argmax(1) == y))


def _score(kind, params, X, y, n_classes, splits, n_views, class_weight, seed) -> dict:
    t0 = time.perf_counter()
    res = cross_validate(kind, params, X, y, n_classes, splits, n_views, class_weight, seed)
    loss, acc = _calibrated(y[res.oof_index], res.oof_proba)
    full = np.zeros((len(y), n_classes))
    full[res.oof_index] = res.oof_proba
    return {
        "kind": kind,
        "params": dict(params),
        "log_loss": round(loss, 5),
        "accuracy": round(acc, 5),
        "seconds": round(time.perf_counter() - t0, 2),
        "_proba": full,
    }


def select_head(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    n_views: int = 1,
    groups=None,
    class_weight=None,
    seed: int = 0,
    mlp: bool = True,
    progress: bool = False,
) -> dict:
    """The best head for features ``X`` (N, n_views, D) and labels ``y`` by inner 3-fold CV.

    Returns ``{"kind", "params", "tried": [...], "folds": 3, "criterion", "seconds"}``;
    ``kind``/``params`` are ready for :func:`stackvision.heads.make_head`.
    """
    t0 = time.perf_counter()
    y = np.asarray(y)
    folds = max(2, min(INNER_FOLDS, int(np.bincount(y).max())))
    splits = kfold_splits(y, folds, seed + 7919, groups)  # not the outer folds' seed
    args = (X, y, n_classes, splits, n_views, class_weight, seed)
    scored: dict[float, dict] = {}

    def try_c(i: int) -> float:
        c = C_GRID[i]
        if c not in scored:
            scored[c] = _score("logreg", {"C": c}, *args)
            r = scored[c]
            say(f"head auto: logreg C={c:g}: log loss {r['log_loss']:.4f}, "
                f"accuracy {r['accuracy']:.4f} ({r['seconds']:.1f} s)", progress)  # fmt: skip
        return scored[c]["log_loss"]

    best = C_GRID.index(LogRegHead.defaults["C"])
    for step in (1, -1):  # walk up while it improves; if the first step up did not, walk down
        i = best
        while 0 <= i + step < len(C_GRID) and try_c(i + step) < try_c(best):
            best = i = i + step
        if i != C_GRID.index(LogRegHead.defaults["C"]):
            break
    winner = scored[C_GRID[best]]
    tried = [{k: v for k, v in scored[c].items() if k != "_proba"} for c in sorted(scored)]
    if mlp:
        # The MLP costs ~10x a logreg fit: it is tried on the first inner fold only, against
        # the best logreg's predictions on the same rows (each with its own temperature).
        rows = splits[0][1]
        r = _score("mlp", {}, X, y, n_classes, splits[:1], n_views, class_weight, seed)
        ref_loss, ref_acc = _calibrated(y[rows], winner["_proba"][rows])
        r.pop("_proba")
        r["compared_on"] = "inner fold 1"
        r["logreg_on_same_rows"] = {"log_loss": round(ref_loss, 5), "accuracy": round(ref_acc, 5)}
        say(f"head auto: mlp (hidden {MLPHead.defaults['hidden']}) on inner fold 1: log loss "
            f"{r['log_loss']:.4f} vs logreg {ref_loss:.4f} ({r['seconds']:.1f} s)", progress)  # fmt: skip
        tried.append(r)
        if r["log_loss"] < ref_loss:
            winner = r
    return {
        "kind": winner["kind"],
        "params": dict(winner["params"]),
        "criterion": f"log loss, inner {folds}-fold CV, after temperature calibration",
        "folds": folds,
        "tried": tried,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def choose_lda(
    X, y, n_classes, C, *, n_views=1, groups=None, class_weight=None, seed=0, progress=False
) -> dict:
    """The weight of the shrinkage-LDA logits in the logreg head (its ``lda`` parameter), by an
    inner 3-fold CV on the training features: for a single head (hold-out or none); with k
    folds, :func:`fold_lda` chooses it from the folds' own out-of-fold logits instead.

    Out-of-fold logits of the logreg head (this ``C``) and of the LDA alone get a temperature
    each; the blend is ``logreg + (T_logreg / T_lda) * lda`` (both at the logreg's scale,
    weighted equally), kept only if its out-of-fold log loss (with its own temperature) beats
    the logreg's. On cub86 / flowers5 / imagewoof (fine-grained stack, flip, 5 folds) the weights
    were 0.017 / 0.28 / 0.085 and val accuracy moved +0.8 / +0.9 / +0.03 points, log loss
    -0.013 / -0.017 / -0.002 (BENCHMARKS.md, issue 12 "the head"); no single fixed weight came
    close on all three.
    """
    t0 = time.perf_counter()
    y = np.asarray(y)
    folds = max(2, min(INNER_FOLDS, int(np.bincount(y).max())))
    splits = kfold_splits(y, folds, seed + 7919, groups)
    heads = [
        fit_head("logreg", {"C": C}, X, y, n_classes, tr, None, n_views, class_weight, seed + fi)
        for fi, (tr, _) in enumerate(splits)
    ]
    out, _ = weigh_lda(heads, X, y, n_classes, splits, n_views, f"inner {folds}-fold CV", t0)
    say_lda(out, progress)
    return out


def choose_head(
    head, head_params, X, y, n_classes, *, lda_by_inner_cv=True, **kwargs
) -> tuple[str, dict | None, dict | None, dict | None]:
    """(kind, params, selection, lda) to train: ``head`` and ``head_params`` as given, or with
    ``head="auto"`` what :func:`select_head` (``kwargs``) chose, and its table; for a logreg head
    whose params do not fix ``lda``, with ``lda_by_inner_cv``, its LDA weight from
    :func:`choose_lda` and that choice (without it, the caller runs :func:`fold_lda`)."""
    sel = None
    if head == "auto":
        sel = select_head(X, y, n_classes, **kwargs)
        head, head_params = sel["kind"], sel["params"]
    params = dict(head_params or {})
    if head != "logreg" or "lda" in params or not lda_by_inner_cv:
        return head, head_params, sel, None
    c = params.get("C", LogRegHead.defaults["C"])
    lda = choose_lda(X, y, n_classes, c, **{k: v for k, v in kwargs.items() if k != "mlp"})
    return head, {**params, "lda": lda["lda"]}, sel, lda


def describe(selection: dict) -> str:
    """One line for people: ``logreg C=0.1 (inner 3-fold log loss 0.412; tried C 0.02..0.2, mlp)``."""
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in selection["params"].items())  # fmt: skip
    win = next(r for r in selection["tried"] if r["kind"] == selection["kind"]
               and r["params"] == selection["params"])  # fmt: skip
    cs = [r["params"]["C"] for r in selection["tried"] if r["kind"] == "logreg"]
    others = [r["kind"] for r in selection["tried"] if r["kind"] != "logreg"]
    tried = f"C {min(cs):g}..{max(cs):g}" + "".join(f", {o}" for o in others)
    return (
        f"{selection['kind']}{' ' + params if params else ''} (inner {selection['folds']}-fold "
        f"log loss {win['log_loss']:.4f}, accuracy {win['accuracy']:.4f}; tried {tried}; "
        f"{selection['seconds']:.0f} s)"
    )
