"""The report a person looks at: plots (PNG) and one ``report.html`` that holds them, the metric
table, the per-class table and a gallery of the most confident mistakes."""

from __future__ import annotations

import html
import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_confusion(cm: np.ndarray, classes: list[str], path: str) -> None:
    plt = _plt()
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = max(5.0, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows normalised)")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class(metrics: dict, path: str) -> None:
    plt = _plt()
    names = list(metrics["per_class"])
    recall = [metrics["per_class"][c]["recall"] for c in names]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(names) + 1)))
    ax.barh(range(len(names)), recall, color="#4c72b0")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (recall)")
    ax.set_title("per-class accuracy")
    for i, r in enumerate(recall):
        ax.text(min(r + 0.01, 0.9), i, f"{r:.3f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confident_mistakes(y: np.ndarray, proba: np.ndarray, limit: int = 24) -> list[int]:
    pred = proba.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    conf = proba[wrong, pred[wrong]]
    return wrong[np.argsort(-conf)][:limit].tolist()


def shown(text: str) -> str:
    """``text`` as printable UTF-8: a file name that is not valid UTF-8 (its bytes held as lone
    surrogates by Python) shows its odd bytes as ``\\xe9`` instead of failing the write."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (from JSON, say)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _escape(text) -> str:
    return html.escape(shown(str(text)))


def _thumbnail(src: str, dst: str, size: int = 160) -> bool:
    from .images import ImageDecodeError, load_rgb

    try:
        img = load_rgb(src, min_side=size)
    except ImageDecodeError:
        return False
    img.thumbnail((size, size))
    img.save(dst, "JPEG", quality=85)
    return True


def write_report(
    out_dir,
    metrics,
    paths,
    y,
    proba,
    classes,
    histories=None,
    problems=None,
    title="stackvision report",
) -> str:
    """Write ``out_dir/report.html`` with its plots and thumbnails; returns the HTML path."""
    os.makedirs(out_dir, exist_ok=True)
    figs = []
    if histories and plot_learning_curves(histories, os.path.join(out_dir, "learning_curves.png")):
        figs.append(("Learning curves", "learning_curves.png"))
    plot_confusion(
        np.asarray(metrics["confusion_matrix"]),
        classes,
        os.path.join(out_dir, "confusion_matrix.png"),
    )
    figs.append(("Confusion matrix", "confusion_matrix.png"))
    plot_per_class(metrics, os.path.join(out_dir, "per_class_accuracy.png"))
    figs.append(("Per-class accuracy", "per_class_accuracy.png"))

    gallery = []
    os.makedirs(os.path.join(out_dir, "mistakes"), exist_ok=True)
    for rank, i in enumerate(confident_mistakes(np.asarray(y), proba)):
        rel = f"mistakes/{rank:02d}.jpg"
        if _thumbnail(paths[i], os.path.join(out_dir, rel)):
            p = int(proba[i].argmax())
            gallery.append((rel, paths[i], classes[int(y[i])], classes[p], float(proba[i, p])))

    e = _escape
    rows = "".join(
        f"<tr><td>{e(k)}</td><td>{metrics[k]:.4f}</td></tr>"
        if isinstance(metrics[k], float)
        else f"<tr><td>{e(k)}</td><td>{metrics[k]}</td></tr>"
        for k in ("n_images", "accuracy", "top5_accuracy", "log_loss", "macro_f1")
        if k in metrics
    )
    pc = "".join(
        f"<tr><td>{e(c)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td><td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
        for c, v in metrics["per_class"].items()
    )
    imgs = "".join(f"<h2>{e(t)}</h2><img src='{e(f)}' alt='{e(t)}'>" for t, f in figs)
    cards = "".join(
        f"<figure><img src='{e(rel)}' title='{e(src)}'><figcaption>true: <b>{e(t)}</b><br>predicted: <b class=bad>{e(p)}</b> ({c:.1%})<br><small>{e(os.path.basename(src))}</small></figcaption></figure>"
        for rel, src, t, p, c in gallery
    )
    probs = "".join(
        f"<li><code>{e(pr.path)}</code>: {e(pr.reason)}</li>" for pr in (problems or [])
    )
    dup = metrics.get("duplicates") or {}
    dups = "".join(
        "<li>" + ", ".join(f"<code>{e(x)}</code>" for x in group) + "</li>"
        for group in dup.get("sets", [])
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 9px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}.gallery{{display:flex;flex-wrap:wrap;gap:10px}}
figure{{margin:0;width:170px;font-size:12px}}figure img{{width:160px;height:160px;object-fit:cover}}.bad{{color:#b00}}</style>
</head><body><h1>{e(title)}</h1>
<p>Evaluated on: {e(str(metrics.get("validation", "given data")))}</p>
<h2>Metrics</h2><table>{rows}</table>
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>images</th></tr>{pc}</table>
{imgs}
<h2>Most confident mistakes</h2><div class="gallery">{cards or "<p>No mistakes.</p>"}</div>
<h2>Identical images ({dup.get("groups", 0)} set(s), each on one side of every split)</h2>
<ul>{dups or "<li>none</li>"}</ul>
<h2>Images left out ({len(problems or [])})</h2><ul>{probs or "<li>none</li>"}</ul>
</body></html>"""
    out = os.path.join(out_dir, "report.html")
    with open(out, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(page)
    return out
