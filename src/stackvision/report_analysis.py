"""What the report says, as numbers (no HTML, no plots): the headline with its spread across
folds, the most-confused class pairs, the per-class table worst first, the classes worth showing
in a readable confusion matrix and an order that puts confused classes next to each other."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

#: the headline metrics, in the order the summary shows them
HEADLINE = ("accuracy", "top5_accuracy", "log_loss", "macro_f1")


@dataclass
class Pair:
    """Two classes confused with each other: ``a_as_b`` images of ``a`` predicted as ``b`` (a
    ``share_a`` of ``a``'s images) and the other way round; ``examples``: rows of the mistaken
    images, most confident first; ``references``: when there are fewer mistakes than examples
    wanted, rows of the class the first mistake was taken for, predicted right, for comparison."""

    a: int
    b: int
    a_as_b: int
    b_as_a: int
    share_a: float
    share_b: float
    examples: list[int] = field(default_factory=list)
    references: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.a_as_b + self.b_as_a


def spread(metrics: dict) -> dict[str, dict]:
    """``{metric: {mean, std, min, max, n}}`` over ``metrics["folds"]`` (empty without folds)."""
    folds = metrics.get("folds") or []
    out = {}
    for key in HEADLINE:
        vals = np.asarray([f[key] for f in folds if key in f], np.float64)
        if len(vals) >= 2:
            out[key] = {
                "mean": float(vals.mean()),
                "std": float(vals.std(ddof=1)),
                "min": float(vals.min()),
                "max": float(vals.max()),
                "n": len(vals),
            }
    return out


def confused_pairs(
    cm: np.ndarray, y: np.ndarray, proba: np.ndarray, top: int = 15, examples: int = 2
) -> list[Pair]:
    """The ``top`` class pairs with the most mistakes between them (both directions added),
    each with up to ``examples`` mistaken rows of ``y``/``proba``, most confident first (and
    references to make up the number, see :class:`Pair`)."""
    cm = np.asarray(cm, np.int64)
    support = np.maximum(cm.sum(axis=1), 1)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    both = np.triu(off + off.T, 1)
    flat = np.flatnonzero(both)
    order = flat[np.lexsort((flat, -both.ravel()[flat]))][:top]  # most first, ties by index
    pred = proba.argmax(axis=1)
    conf = proba[np.arange(len(pred)), pred]
    pairs = []
    for k in order:
        a, b = divmod(int(k), cm.shape[0])
        rows = np.flatnonzero(((y == a) & (pred == b)) | ((y == b) & (pred == a)))
        rows = rows[np.argsort(-conf[rows], kind="stable")][:examples]
        pair = Pair(a, b, int(off[a, b]), int(off[b, a]), off[a, b] / support[a],
                    off[b, a] / support[b], rows.tolist())  # fmt: skip
        if len(rows) < examples:
            other = int(pred[rows[0]])  # what the mistake was taken for: show a real one
            ref = np.flatnonzero((y == other) & (pred == other))
            if not len(ref):
                ref = np.flatnonzero(y == other)
            ref = ref[np.argsort(-proba[ref, other], kind="stable")]
            pair.references = ref[: examples - len(rows)].tolist()
        pairs.append(pair)
    return pairs


def per_class_rows(metrics: dict, classes: list[str]) -> list[dict]:
    """One row per class with images: recall, precision, F1, support and the class its images
    are most often taken for (with the count); worst recall first (then F1, then name)."""
    cm = np.asarray(metrics["confusion_matrix"], np.int64)
    rows = []
    for i, name in enumerate(classes):
        v = metrics["per_class"][name]
        wrong = cm[i].copy()
        wrong[i] = 0
        j = int(wrong.argmax())
        rows.append(
            {
                "class": name,
                "recall": v["recall"],
                "precision": v["precision"],
                "f1": v["f1"],
                "support": v["support"],
                "confused_with": classes[j] if wrong[j] else None,
                "confused_count": int(wrong[j]),
            }
        )
    rows.sort(key=lambda r: (r["support"] == 0, r["recall"], r["f1"], r["class"]))
    return rows


def focus_classes(pairs: list[Pair], n_classes: int, limit: int = 30) -> list[int]:
    """The classes a readable matrix shows: every class when there are at most ``limit``, else
    those of the top confused pairs (at most ``limit``)."""
    if n_classes <= limit:
        return list(range(n_classes))
    seen: dict[int, None] = {}
    for p in pairs:
        for c in (p.a, p.b):
            if len(seen) < limit:
                seen.setdefault(c)
    return sorted(seen)


def cluster_order(cm: np.ndarray) -> list[int]:
    """An order of the classes that puts classes confused with each other side by side
    (average-linkage clustering on 1 - symmetric confusion rate, optimal leaf order)."""
    cm = np.asarray(cm, np.float64)
    n = cm.shape[0]
    if n <= 2:
        return list(range(n))
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    rate = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    sim = (rate + rate.T) / 2
    np.fill_diagonal(sim, 0)
    dist = 1.0 - sim / max(float(sim.max()), 1e-12)
    np.fill_diagonal(dist, 0)
    condensed = squareform(dist, checks=False)
    z = linkage(condensed, "average")
    if n <= 400:  # O(n^3): a few ms at 120 classes, too slow for thousands
        z = optimal_leaf_ordering(z, condensed)
    return leaves_list(z).tolist()


def problem_counts(problems) -> list[tuple[str, int]]:
    """Problems grouped by reason (up to the first ``:``, ``(`` or ``;`` that starts the
    details), most first."""
    reasons = Counter(re.split(r"[:(;]", _reason(p))[0].strip()[:80] or "unknown" for p in problems)
    return reasons.most_common()


def _reason(p) -> str:
    return str(p.get("reason", "") if isinstance(p, dict) else getattr(p, "reason", ""))


def _path(p) -> str:
    return str(p.get("path", "") if isinstance(p, dict) else getattr(p, "path", ""))


def problem_list(problems) -> list[tuple[str, str]]:
    """(path, reason) of each problem, whether given as ``Problem``s or dicts."""
    return [(_path(p), _reason(p)) for p in problems]


def confident_mistakes(y: np.ndarray, proba: np.ndarray, limit: int = 24) -> list[int]:
    """Rows of the wrong predictions, most confident first."""
    pred = proba.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    conf = proba[wrong, pred[wrong]]
    return wrong[np.argsort(-conf, kind="stable")][:limit].tolist()
