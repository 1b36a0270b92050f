"""The report, produced through the CLI (`train`, `evaluate`) for a many-class model (86 bird
species) and for every model kind: sections in the order of the questions they answer, the
top confused pairs with thumbnails, per class worst first, a bounded matrix and the full CSV."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from .conftest import KINDS
from .report_helpers import SECTIONS, parse, section_ids, table_rows


def _folder_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _check_many_class_report(model_dir, report_dir, extra=()):
    metrics = json.loads((model_dir / "metrics.json").read_text())
    classes = metrics["classes"]
    assert len(classes) == 86
    doc = parse(report_dir / "report.html")
    assert section_ids(doc) == [s for s in SECTIONS if s != "curves"] + list(extra)

    # the top 15 confused pairs, most first, two thumbnails of mistaken images each
    cm = np.asarray(metrics["confusion_matrix"])
    rows = table_rows(doc, "pairs-table")
    assert len(rows) == 15
    totals = [int(r[5].all_text()) for r in rows]
    assert totals == sorted(totals, reverse=True)
    off = cm - np.diag(np.diag(cm))
    both = off + off.T
    assert totals[0] == both.max()  # the worst pair really is the one with the most mistakes
    for r in rows:
        a, b = r[1].all_text(), r[2].all_text()
        i, j = classes.index(a), classes.index(b)
        assert int(r[3].all_text().split()[0]) == cm[i, j]
        assert int(r[4].all_text().split()[0]) == cm[j, i]
        thumbs = r[6].find_all("img")
        assert len(thumbs) == 2
        for t in thumbs:
            img = Image.open(report_dir / t.attrs["src"])
            assert img.format == "JPEG" and max(img.size) <= 144
        alts = [t.attrs["alt"] for t in thumbs]
        # a mistake between these two classes, the most confident first; a pair with one
        # mistake shows a real image of the class the mistake was taken for beside it
        assert set(alts[0].split(" as ")) == {a, b}
        if cm[i, j] + cm[j, i] >= 2:
            assert set(alts[1].split(" as ")) == {a, b}
        else:
            assert alts[1] == alts[0].split(" as ")[1] + ", for comparison"

    # per class: every class, worst recall first, with the class it is most often taken for
    pc = table_rows(doc, "per-class-table")
    assert len(pc) == 86
    recalls = [float(r[1].all_text()) for r in pc]
    assert recalls == sorted(recalls)
    worst = pc[0][0].all_text()
    assert metrics["per_class"][worst]["recall"] == pytest.approx(recalls[0], abs=1e-3)

    # the matrix stays readable: at most 30 named classes, a bounded image; the CSV is complete
    png = Image.open(report_dir / "confusion_matrix.png")
    assert max(png.size) <= 1400
    assert max(Image.open(report_dir / "confusion_overview.png").size) <= 800
    with open(report_dir / "confusion_matrix.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    assert table[0][1:] == classes and [r[0] for r in table[1:]] == classes
    assert np.array_equal(np.asarray([r[1:] for r in table[1:]], int), cm)

    # mistakes: most confident first, each with true / predicted / probability
    figures = doc.find("section", id="mistakes").find_all("figure")
    probs = [float(f.all_text().split("(")[-1].split("%")[0]) for f in figures]
    assert figures and probs == sorted(probs, reverse=True)

    assert _folder_bytes(report_dir) < 3_000_000  # self-contained and of a sane size
    return doc, metrics


def test_train_report_for_86_classes(cub_dir):
    doc, metrics = _check_many_class_report(cub_dir, cub_dir / "report", ["doctor"])
    # the headline with its spread over the 3 folds, top-5 shown (86 classes)
    folds = metrics["folds"]
    assert [f["fold"] for f in folds] == [1, 2, 3]
    assert sum(f["n_images"] for f in folds) == metrics["n_images"] == 86 * 3
    weighted = sum(f["accuracy"] * f["n_images"] for f in folds) / metrics["n_images"]
    assert weighted == pytest.approx(metrics["accuracy"])
    head = table_rows(doc, "headline")
    assert [r[0].all_text() for r in head] == ["accuracy", "top-5 accuracy", "log loss", "macro F1"]
    acc = [f["accuracy"] for f in folds]
    assert head[0][2].all_text() == f"{np.mean(acc):.4f} \u00b1 {np.std(acc, ddof=1):.4f}"
    assert head[0][3].all_text() == f"{min(acc):.4f} \u2013 {max(acc):.4f}"
    lls = [f["log_loss"] for f in folds]  # worst first: the highest loss
    assert head[2][3].all_text() == f"{max(lls):.4f} \u2013 {min(lls):.4f}"
    assert all(0 <= f["macro_f1"] <= 1 for f in folds) and "\u00b1" in head[3][2].all_text()
    summary = doc.find("section", id="summary").all_text()
    assert "3-fold out-of-fold" in summary and "86 classes" in summary
    assert "No identical images." in summary and "No file was left out." in summary


def test_evaluate_report_for_86_classes(cub_eval, cub_dir):
    doc, metrics = _check_many_class_report(cub_eval, cub_eval / "report")
    summary = doc.find("section", id="summary").all_text()
    assert "a held-out set the model did not train on" in summary
    assert "across the" not in summary  # no folds in an evaluation
    assert metrics["n_images"] == 86


@pytest.mark.parametrize("kind", list(KINDS))
def test_report_sections_for_every_kind(kind, request):
    model_dir = request.getfixturevalue(KINDS[kind][0])
    doc = parse(model_dir / "report" / "report.html")
    curves = kind in ("stack-mlp", "finetune")  # the kinds with epoch histories
    doctor = ["doctor"] if kind.startswith("stack") else []  # train adds the data doctor
    assert section_ids(doc) == [s for s in SECTIONS if curves or s != "curves"] + doctor
    head = [r[0].all_text() for r in table_rows(doc, "headline")]
    assert head == ["accuracy", "log loss", "macro F1"]  # 3 classes: top-5 means nothing
    summary = doc.find("section", id="summary").all_text()
    spread = "across the 2 folds" in summary
    assert spread == kind.startswith("stack")  # finetune: hold-out; ensemble mean: nothing fitted
    text = (model_dir / "report" / "confusion_matrix.csv").read_text(encoding="utf-8")
    rows = list(csv.reader(text.splitlines()))
    assert rows[0][1:] == ["daisy", "sunflower", "tulip"]


def test_extra_sections_from_a_model_go_into_its_report(flowers_small, cache_dir, tmp_path):
    """The hook for later pages (a data doctor, say): Section(title, html, files) set on a model
    before save() comes last in report.html, in the contents bar, with its files beside it."""
    import io

    from stackvision import Runtime, StackedClassifier
    from stackvision.data import load_labelled
    from stackvision.report import Section
    from stackvision.report_html import e

    listing = load_labelled(str(flowers_small))
    model = StackedClassifier(["lite0"], folds=2, tta="none", runtime=Runtime(cache_dir))
    model.fit(listing.paths, listing.labels)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "PNG")
    model.report_sections = [
        Section(
            "Data doctor",
            f"<p id=doctor-text>{e('sizes <ok> & fine')}</p><img src='doctor/sizes.png'>",
            files={"doctor/sizes.png": buf.getvalue()},
        )
    ]
    out = tmp_path / "m"
    model.save(str(out))
    doc = parse(out / "report" / "report.html")
    assert section_ids(doc)[-2:] == ["data", "x-data-doctor"]
    assert [a.all_text() for a in doc.find("nav").find_all("a")][-1] == "Data doctor"
    assert doc.find("p", id="doctor-text").all_text() == "sizes <ok> & fine"
    assert Image.open(out / "report" / "doctor" / "sizes.png").size == (40, 30)


def test_a_section_file_outside_the_report_folder_is_refused(tmp_path):
    from stackvision.report import Section, write_report

    classes = ["a", "b"]
    img = tmp_path / "x.jpg"
    Image.new("RGB", (32, 32)).save(img)
    y, proba = np.array([0, 1]), np.array([[0.9, 0.1], [0.6, 0.4]])
    from stackvision.metrics import classification_metrics

    metrics = classification_metrics(y, proba, classes)
    bad = Section("Escape", "<p>x</p>", files={"../outside.txt": b"x"})
    with pytest.raises(ValueError, match="inside the report folder"):
        write_report(tmp_path / "r", metrics, [str(img)] * 2, y, proba, classes, sections=[bad])
    assert not (tmp_path / "outside.txt").exists()


def test_summary_counts_the_files_left_out_by_reason(flowers_small, cache_dir, tmp_path):
    """Bad files given to `train` are counted by reason at the top and listed at the bottom."""
    import shutil

    from .cli_helpers import train

    data = tmp_path / "data"
    shutil.copytree(flowers_small, data)
    (data / "daisy" / "empty.jpg").write_bytes(b"")
    (data / "tulip" / "empty.jpg").write_bytes(b"")
    (data / "tulip" / "text.jpg").write_bytes(b"this is not a JPEG at all")
    assert train(data, tmp_path / "m", cache_dir) == 0
    doc = parse(tmp_path / "m" / "report" / "report.html")
    summary = doc.find("section", id="summary").all_text()
    assert "3 file(s) left out: 2 \u00d7 empty file" in summary, summary
    listed = doc.find("section", id="data").find("ul").find_all("li")
    assert sorted(li.find("code").all_text().rsplit("/", 2)[-2] for li in listed) == [
        "daisy",
        "tulip",
        "tulip",
    ]


def test_a_perfect_40_class_model_still_gets_a_bounded_matrix(tmp_path):
    """No mistakes at all over 30 classes: no pairs, no gallery, the matrix shows 30 classes."""
    from stackvision.metrics import classification_metrics
    from stackvision.report import write_report

    from .conftest import synthetic_image

    classes = [f"class {i:02d}" for i in range(40)]
    paths = []
    for i in range(80):
        p = tmp_path / f"{i}.png"
        synthetic_image(seed=i).save(p)
        paths.append(str(p))
    y = np.arange(80) % 40
    proba = np.full((80, 40), 0.1 / 39)
    proba[np.arange(80), y] = 0.9
    metrics = classification_metrics(y, proba, classes)
    write_report(tmp_path / "r", metrics, paths, y, proba, classes)
    doc = parse(tmp_path / "r" / "report.html")
    assert "No mistakes" in doc.find("section", id="pairs").all_text()
    assert "No mistakes" in doc.find("section", id="mistakes").all_text()
    assert "30 of the 40 classes" in doc.find("section", id="matrix").all_text()
    assert max(Image.open(tmp_path / "r" / "confusion_matrix.png").size) <= 1400
    assert not os.listdir(tmp_path / "r" / "thumbs")  # nothing to show, nothing decoded


def test_folds_and_a_validation_set_show_the_validation_rows(
    flowers_small, heldout, cache_dir, tmp_path
):
    """`train --folds 2 --val DATA`: the headline is out-of-fold with the validation metrics
    beside it; the pairs, tables, matrix and mistakes are those of the validation images."""
    from .cli_helpers import train

    assert train(flowers_small, tmp_path / "m", cache_dir, "--val", heldout) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    doc = parse(tmp_path / "m" / "report" / "report.html")
    summary = doc.find("section", id="summary").all_text()
    assert "On the validation set given" in summary
    assert "below: on the validation set given (12 images)" in summary
    text = (tmp_path / "m" / "report" / "confusion_matrix.csv").read_text(encoding="utf-8")
    counts = np.asarray([r[1:] for r in csv.reader(text.splitlines())][1:], int)
    assert counts.sum() == 12 and metrics["n_images"] == 30
    support = [int(r[4].all_text()) for r in table_rows(doc, "per-class-table")]
    assert support == [4, 4, 4]
