"""Classification metrics from probabilities: one dict, the same keys everywhere."""

from __future__ import annotations

import numpy as np


def top_k_accuracy(y: np.ndarray, proba: np.ndarray, k: int) -> float:
    k = min(k, proba.shape[1])
    top = np.argsort(-proba, axis=1)[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    p = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
    return float(-np.mean(np.log(p))) + 0.0  # + 0.0 turns -0.0 into 0.0


def classification_metrics(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """accuracy, top5_accuracy, log_loss, n_images, per_class (precision/recall/f1/support),
    confusion_matrix (rows true, columns predicted, in ``classes`` order)."""
    y = np.asarray(y, dtype=np.int64)
    n_classes = len(classes)
    pred = proba.argmax(axis=1)
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class = {}
    for c, name in enumerate(classes):
        tp = cm[c, c]
        support = int(cm[c].sum())
        predicted = int(cm[:, c].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": round(float(precision), 6),
            "recall": round(float(recall), 6),
            "f1": round(float(f1), 6),
            "support": support,
        }
    present = [v for v in per_class.values() if v["support"]]
    return {
        "n_images": int(len(y)),
        "accuracy": float(np.mean(pred == y)) if len(y) else float("nan"),
        "top5_accuracy": top_k_accuracy(y, proba, 5),
        "log_loss": log_loss(y, proba),
        "macro_f1": float(np.mean([v["f1"] for v in present])) if present else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def summary_row(m: dict) -> dict:
    """The headline numbers of a metrics dict."""
    return {k: m[k] for k in ("n_images", "accuracy", "top5_accuracy", "log_loss")}
