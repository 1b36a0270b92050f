"""``train --compare``: what stacking, folds and flips each bought, on the same splits."""

from __future__ import annotations

from .metrics import classification_metrics
from .validation import apply_temperature, cross_validate, fit_temperature, kfold_splits


def compare_table(model) -> list[dict]:
    """Cross-validated metrics of each backbone alone and of the stack, with and without flip TTA.

    Uses the fitted ``model``'s cached features and its k-fold splits (5 folds if it had none), so
    every row sees the same images; each row is temperature-calibrated on its own out-of-fold
    predictions, as the real model is.
    """
    feats = model._features_cache
    y = model._feature_y  # labels of every usable training image, aligned with feats
    splits = getattr(model, "splits_", None) or kfold_splits(y, 5, model.seed)
    names = [s.name for s in model.specs_]
    configs = [[n] for n in names] + ([names] if len(names) > 1 else [])
    view_opts = [1, 2] if len(feats.views) == 2 else [1]
    cw = None if model.class_weight in (None, "none") else model.class_weight
    rows = []
    for cfg in configs:
        X = feats.stacked(cfg)
        for nv in view_opts:
            res = cross_validate(
                model.head, model.head_params, X, y, len(model.classes_), splits, nv, cw, model.seed
            )
            t = fit_temperature(res.oof_proba, y[res.oof_index]) if model.calibrate else 1.0
            m = classification_metrics(
                y[res.oof_index], apply_temperature(res.oof_proba, t), model.classes_
            )
            rows.append(
                {
                    "model": "+".join(cfg) + (" (stack)" if len(cfg) > 1 else ""),
                    "views": "orig+flip" if nv == 2 else "orig",
                    "accuracy": m["accuracy"],
                    "top5_accuracy": m["top5_accuracy"],
                    "log_loss": m["log_loss"],
                }
            )
    return rows
