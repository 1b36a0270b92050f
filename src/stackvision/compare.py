"""``train --compare``: what stacking, folds and flips each bought, on the same splits; and
``train --preset best``'s "what each step bought" table (:func:`steps_table`)."""

from __future__ import annotations

import numpy as np

from .metrics import classification_metrics
from .validation import (
    apply_temperature,
    cross_validate,
    ensemble_proba,
    fit_temperature,
    kfold_splits,
    predict_views,
)


def compare_table(model) -> list[dict]:
    """Metrics of each backbone alone and of the stack, with and without flip TTA.

    Every row uses the fitted ``model``'s cached features and the same k-fold splits (5 folds if the
    model had none) and is temperature-calibrated on its own out-of-fold predictions, as the real
    model is. Columns ``cv_*`` are out-of-fold. When the model was fitted with ``val=``, columns
    ``val_*`` score the K-fold ensemble on that held-out data, and a last row scores the first
    fold head alone on it, which shows what averaging the fold heads bought.
    """
    feats = model._features_cache
    y = model._feature_y  # labels of every usable training image, aligned with feats
    groups = np.unique(feats.hashes, return_inverse=True)[1]  # identical images: one side
    splits = model.splits_ or kfold_splits(y, 5, model.seed, groups)
    names = [s.name for s in model.specs_]
    configs = [[n] for n in names] + ([names] if len(names) > 1 else [])
    view_opts = [1, 2] if len(feats.views) == 2 else [1]
    cw = None if model.class_weight in (None, "none") else model.class_weight
    n_classes = len(model.classes_)
    val = model._val_data
    rows = []
    for cfg in configs:
        X = feats.stacked(cfg)
        for nv in view_opts:
            res = cross_validate(
                model.head_kind_, model.head_params_, X, y, n_classes, splits, nv, cw, model.seed
            )
            t = fit_temperature(res.oof_proba, y[res.oof_index]) if model.calibrate else 1.0
            m = classification_metrics(
                y[res.oof_index], apply_temperature(res.oof_proba, t), model.classes_
            )
            row = {
                "model": "+".join(cfg) + (" (stack)" if len(cfg) > 1 else ""),
                "views": "orig+flip" if nv == 2 else "orig",
                "heads": f"{len(splits)} folds",
                "cv_accuracy": m["accuracy"],
                "cv_log_loss": m["log_loss"],
            }
            if val is not None:
                vfeats, vy = val
                Xv = vfeats.stacked(cfg)
                vm = classification_metrics(
                    vy, apply_temperature(ensemble_proba(res.heads, Xv, nv), t), model.classes_
                )
                row.update(val_accuracy=vm["accuracy"], val_log_loss=vm["log_loss"])
                if cfg is configs[-1] and nv == view_opts[-1]:
                    rows.append(row)
                    sm = classification_metrics(
                        vy,
                        apply_temperature(predict_views(res.heads[0], Xv, nv), t),
                        model.classes_,
                    )
                    row = {
                        **row,
                        "heads": "fold 1 alone",
                        "cv_accuracy": None,
                        "cv_log_loss": None,
                        "val_accuracy": sm["accuracy"],
                        "val_log_loss": sm["log_loss"],
                    }
            rows.append(row)
    return rows


STEP_COLS = ("step", "seconds", "scored on", "n_images", "accuracy", "log_loss", "gain_accuracy",
             "gain_log_loss", "note")  # fmt: skip


def steps_table(rows: list[dict]) -> list[dict]:
    """Rows of the pipeline's steps (``step``, ``seconds``, ``scored on``, metrics, ``note``)
    with what each bought: ``gain_accuracy`` / ``gain_log_loss`` (negative is better) against
    the first row scored on the same images (the stack there)."""
    first: dict[str, dict] = {}
    out = []
    for r in rows:
        r = dict(r)
        base = first.setdefault(r["scored on"], r) if "accuracy" in r else None
        if base is not None and base is not r:
            r["gain_accuracy"] = r["accuracy"] - base["accuracy"]
            r["gain_log_loss"] = r["log_loss"] - base["log_loss"]
        out.append(r)
    return out
