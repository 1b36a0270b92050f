"""The report a person looks at: ``report.html`` and the files beside it, built around the questions
a reader asks, in this order:

1. **Summary**: how good is it (accuracy, log loss, top-5 when there are more than 5 classes, macro
   F1), how much does that move from fold to fold (mean ± std, worst - best fold, where there are
   folds), on what was it measured (out-of-fold, a hold-out split, or a held-out set for
   ``evaluate``), how many images and classes, which files were left out and why, identical images.
2. **Most-confused class pairs**: the top 15 pairs by mistakes both ways, each with its counts, the
   share of the true class, and two thumbnails of the mistaken images (one mistake and, for
   comparison, a real image of the class it was taken for, when there was only one).
3. **Per class, worst first**: recall, precision, F1, images, and the class it is most often taken
   for; ``per_class_accuracy.png`` plots the 40 worst.
4. **Confusion matrix**: ``confusion_matrix.png`` shows every class up to 30 classes, else only the
   classes of the top confusions, in clustered order, every label readable;
   ``confusion_overview.png`` (over 30 classes) the whole matrix clustered, mistakes only;
   ``confusion_matrix.csv`` the full matrix of counts (class names as header and index).
5. **Most confident mistakes**: true / predicted / probability, most confident first.
6. **Learning curves**, when there are histories (mlp heads, fine-tuning).
7. **Data problems**: every file left out, with its reason, and the sets of identical images.
8. **Extra sections** given by the caller (see below).

Every size is bounded whatever the number of classes or images: plots of at most ~1400 px, at most
54 thumbnails (small JPEGs under ``thumbs/``), at most 200 problems listed one by one. The folder is
self-contained: the page only links files inside it.

**Extra sections.** ``write_report(..., sections=[Section(title, html)])`` appends each section, in
order, after the built-in ones and lists it in the contents bar. ``html`` is inserted as it is:
build it with :func:`stackvision.report_html.e` for any text from the data. ``files`` maps names
relative to the report folder (``"doctor/sizes.png"``) to bytes written beside the page, for images
the section shows. Models carry the sections their ``save()`` adds in ``model.report_sections``
(empty by default): set it before saving.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import report_html as rh
from .report_analysis import (
    cluster_order,
    confident_mistakes,
    confused_pairs,
    focus_classes,
    per_class_rows,
)
from .report_html import shown  # noqa: F401 - the name callers used before the split

__all__ = ["Section", "write_report", "shown"]

TOP_PAIRS = 15
#: most classes the labelled confusion matrix shows
MATRIX_CLASSES = 30
THUMB_PX = 144


@dataclass(frozen=True)
class Section:
    """One more section of ``report.html``: its title (also the contents entry), its HTML body,
    an optional element id (default: from the title) and files to write beside the page."""

    title: str
    html: str
    id: str = ""
    files: dict[str, bytes] = field(default_factory=dict)

    def anchor(self) -> str:
        slug = "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")
        return self.id or "x-" + (slug or "section")


def _thumbnail(src: str, dst: str, size: int = THUMB_PX) -> bool:
    from .images import ImageDecodeError, load_rgb

    try:
        img = load_rgb(src, min_side=size)
    except ImageDecodeError:
        return False
    img.thumbnail((size, size))
    img.save(dst, "JPEG", quality=82)
    return True


class _Thumbs:
    """Thumbnails of rows, each made once (a mistake can be in a pair and in the gallery)."""

    def __init__(self, out_dir: str, paths: Sequence[str]):
        self.out_dir, self.paths, self.made = out_dir, paths, {}
        os.makedirs(os.path.join(out_dir, "thumbs"), exist_ok=True)

    def __call__(self, row: int) -> str | None:
        if row not in self.made:
            rel = f"thumbs/{row:06d}.jpg"
            ok = _thumbnail(self.paths[row], os.path.join(self.out_dir, rel))
            self.made[row] = rel if ok else None
        return self.made[row]


def write_confusion_csv(cm: np.ndarray, classes: Sequence[str], path: str) -> None:
    """The full confusion matrix of counts: rows true, columns predicted, names as header/index."""
    names = [shown(c) for c in classes]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["true \\ predicted", *names])
        for name, row in zip(names, np.asarray(cm, np.int64).tolist()):
            w.writerow([name, *row])


def _section_files(out_dir: str, sec: Section) -> None:
    for rel, data in sec.files.items():
        parts = rel.replace("\\", "/").split("/")
        if os.path.isabs(rel) or ".." in parts or not rel:
            raise ValueError(f"report section file {rel!r} must be a path inside the report folder")
        dst = os.path.join(out_dir, *parts)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as fh:
            fh.write(data)


def _matrix(out_dir: str, cm: np.ndarray, classes: list[str], pairs) -> str:
    """The confusion matrix files (readable PNG, overview over 30 classes, CSV) and their HTML."""
    from . import report_plots as plots

    order = cluster_order(cm)
    focus = set(focus_classes(pairs, len(classes)) or order[:MATRIX_CLASSES])
    rows = [i for i in order if i in focus]
    plots.plot_confusion(cm, classes, os.path.join(out_dir, "confusion_matrix.png"), rows)
    overview = None
    if len(rows) < len(classes):
        overview = "confusion_overview.png"
        plots.plot_confusion_overview(cm, order, os.path.join(out_dir, overview))
    write_confusion_csv(cm, classes, os.path.join(out_dir, "confusion_matrix.csv"))
    return rh.matrix_part("confusion_matrix.png", len(rows), len(classes), overview, bool(pairs))


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
    sections: Sequence[Section] = (),
) -> str:
    """Write ``out_dir/report.html`` with its plots, thumbnails and ``confusion_matrix.csv`` for
    the predictions ``proba`` of the images ``paths`` with true class indices ``y`` (the rows
    ``metrics`` were computed on); returns the HTML path."""
    from . import report_plots as plots

    os.makedirs(out_dir, exist_ok=True)
    y, proba, classes = np.asarray(y, np.int64), np.asarray(proba), list(classes)
    detail, note = metrics, None
    if "holdout" in metrics or len(y) != metrics.get("n_images"):
        # folds and a separate validation set: the rows shown are those of the validation set
        from .metrics import classification_metrics

        detail = classification_metrics(y, proba, classes)
        note = f"the validation set given ({len(y):,} images)"
    cm = np.asarray(detail["confusion_matrix"], np.int64)
    n = len(classes)
    thumbs = _Thumbs(out_dir, paths)
    parts: list[tuple[str, str, str]] = []

    on = rh.evaluated_on(metrics)
    parts.append(("summary", "Summary", rh.summary(metrics, n, problems, on, note)))

    pairs = confused_pairs(cm, y, proba, TOP_PAIRS)
    shots = {r: t for p in pairs for r in p.examples + p.references if (t := thumbs(r))}
    parts.append(
        ("pairs", "Most-confused class pairs", rh.pairs_table(pairs, classes, shots, y, proba))
    )

    rows = per_class_rows(detail, classes)
    plots.plot_per_class(rows, os.path.join(out_dir, "per_class_accuracy.png"))
    table = rh.per_class_table(rows, "per_class_accuracy.png")
    parts.append(("per-class", "Per class, worst first", table))
    parts.append(("matrix", "Confusion matrix", _matrix(out_dir, cm, classes, pairs)))

    cards = []
    for i in confident_mistakes(y, proba):
        rel = thumbs(i)
        if rel:
            p = int(proba[i].argmax())
            cards.append((rel, paths[i], classes[int(y[i])], classes[p], float(proba[i, p])))
    parts.append(("mistakes", "Most confident mistakes", rh.gallery(cards)))

    if histories and plots.plot_learning_curves(
        histories, os.path.join(out_dir, "learning_curves.png")
    ):
        img = "<img src='learning_curves.png' alt='learning curves'>"
        parts.append(("curves", "Learning curves", img))

    parts.append(("data", "Data problems", rh.data_part(problems, metrics)))
    for sec in sections:
        _section_files(out_dir, sec)
        parts.append((sec.anchor(), sec.title, sec.html))

    out = os.path.join(out_dir, "report.html")
    with open(out, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(rh.page(title, parts))
    return out
