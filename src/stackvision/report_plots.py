"""The report's PNG plots, each of a bounded size whatever the number of classes: learning
curves, a labelled confusion matrix of at most ~30 classes, an unlabelled overview of the whole
matrix in clustered order, and the per-class recall of the worst classes."""

from __future__ import annotations

import numpy as np

DPI = 100
#: longest class name drawn on an axis (longer ones lose their middle to "...")
LABEL_CHARS = 28


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(name: str) -> str:
    from .report_html import shown

    name = shown(name)
    if len(name) <= LABEL_CHARS:
        return name
    head = (LABEL_CHARS - 1) // 2  # keep both ends: names often differ only at one of them
    return name[:head] + "\u2026" + name[-(LABEL_CHARS - 1 - head) :]


def _rates(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm, dtype=np.float64)
    return cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)


def plot_learning_curves(histories: list[list[dict]], path: str) -> bool:
    histories = [h for h in histories if h]
    if not histories:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, hist in enumerate(histories):
        ep = [h["epoch"] for h in hist]
        tag = f"fold {k + 1}" if len(histories) > 1 else ""
        for ax, key in zip(axes, ("loss", "accuracy")):
            (line,) = ax.plot(ep, [h[key] for h in hist], alpha=0.8, label=f"train {tag}".strip())
            ax.plot(
                ep,
                [h[f"val_{key}"] for h in hist],
                "--",
                color=line.get_color(),
                alpha=0.8,
                label=f"val {tag}".strip(),
            )
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(f"{key} per epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def plot_confusion(cm: np.ndarray, classes: list[str], path: str, rows: list[int]) -> None:
    """The confusion matrix restricted to ``rows`` (class indices, in that order; at most ~30),
    each row normalised by all the images of its true class, every class named."""
    plt = _plt()
    norm = _rates(cm)[np.ix_(rows, rows)]
    n = len(rows)
    names = [_label(classes[i]) for i in rows]
    size = min(max(5.0, 0.32 * n + 3.0), 13.0)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    part = "" if n == len(classes) else f"; {n} of {len(classes)} classes"
    ax.set_title(f"confusion matrix (share of each true class{part})")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6 if n > 15 else 7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_confusion_overview(cm: np.ndarray, order: list[int], path: str) -> None:
    """The whole matrix in ``order`` (clustered), 7 x 7 inches whatever the number of classes:
    blocks off the diagonal are groups of classes confused with each other."""
    plt = _plt()
    norm = _rates(cm)[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(7.5, 7))
    off = norm.copy()
    np.fill_diagonal(off, np.nan)  # the diagonal would drown the confusions
    im = ax.imshow(off, cmap="magma_r", vmin=0, vmax=max(float(np.nanmax(off)), 0.05))
    ax.set_xlabel("predicted (position in clustered order)")
    ax.set_ylabel("true (position in clustered order)")
    ax.set_title(f"all {len(order)} classes, clustered: mistakes only")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_per_class(rows: list[dict], path: str, limit: int = 40) -> None:
    """Recall of the ``limit`` worst classes (``rows`` sorted worst first), a bounded height."""
    plt = _plt()
    total, rows = len(rows), rows[:limit]
    names = [_label(r["class"]) for r in rows]
    recall = [r["recall"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(names) + 1.2)))
    ax.barh(range(len(names)), recall, color="#4c72b0")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (recall)")
    ax.set_title(
        "per-class accuracy" + (f", the {limit} worst of {total}" if total > limit else "")
    )
    for i, r in enumerate(recall):
        ax.text(min(r + 0.01, 0.9), i, f"{r:.3f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
