"""The data doctor (issue 15): label issues, near-duplicates and leaks, outliers, the CSV fed
back with --exclude, --group-duplicates, the report section; on real imagewoof images."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from stackvision.cli import main
from stackvision.doctor_output import CSV_COLUMNS, DOCTOR_FORMAT
from stackvision.neighbours import (
    duplicate_pairs,
    embed,
    groups_from_pairs,
    knn,
    near_duplicate_groups,
)

from .cli_helpers import one_line_error, train
from .conftest import synthetic_image
from .serving_helpers import images_of

LITE0 = ["--backbones", "lite0", "--tta", "none", "-q"]


def reencode(src, dst, crop=6, scale=0.8, quality=70) -> None:
    """A near-duplicate: small off-centre crop, resize, JPEG re-encode (other bytes)."""
    im = Image.open(src).convert("RGB")
    w, h = im.size
    im = im.crop((crop, crop // 2, w - crop, h - crop)).resize((int(w * scale), int(h * scale)))
    im.save(dst, "JPEG", quality=quality)


@pytest.fixture()
def dirty(woof_train, woof_val, tmp_path):
    """The woof slice with one beagle filed as a golden retriever, and a re-encoded copy of a
    Shih-Tzu training image in the validation folder (a leak)."""
    tr, va = tmp_path / "train", tmp_path / "val"
    shutil.copytree(woof_train, tr)
    shutil.copytree(woof_val, va)
    classes = sorted(os.listdir(tr))  # Shih-Tzu, ridgeback, beagle, golden retriever
    beagle = sorted((tr / classes[2]).iterdir())[0]
    wrong = tr / classes[3] / "beagle-filed-as-golden.JPEG"
    shutil.move(beagle, wrong)
    src = sorted((tr / classes[0]).iterdir())[0]
    leak = va / classes[0] / "copy-of-train.jpg"
    reencode(src, leak)
    return {"train": tr, "val": va, "classes": classes, "wrong": wrong, "src": src, "leak": leak}


def doctor(*args) -> int:
    return main(["doctor", *map(str, args)])


# ---------------------------------------------------------------------- neighbours
def test_exact_knn_is_brute_force_and_hnsw_agrees():
    rng = np.random.default_rng(0)
    E = embed(rng.normal(size=(300, 32)).astype(np.float32), pca=None).vectors
    sims, idx = knn(E, 5)
    S = E @ E.T
    np.fill_diagonal(S, -np.inf)
    assert (idx[:, 0] == S.argmax(1)).all()
    np.testing.assert_allclose(sims[:, 0], S.max(1), rtol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # most similar first
    hs, hi = knn(E, 5, exact_max=0)  # faiss HNSW
    assert (hi[:, 0] == idx[:, 0]).mean() > 0.97
    assert (hi != np.arange(300)[:, None]).all()  # never itself


def test_wide_rows_are_searched_on_a_projection_and_rescored_exactly():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 640)).astype(np.float32)
    X = centres[rng.integers(0, 40, 4200)] + 0.5 * rng.normal(size=(4200, 640)).astype(np.float32)
    E = embed(X, pca=None).vectors
    sims, idx = knn(E, 5)  # 640 > 512 dims, 4,200 > 4,000 rows: the projected path
    exact_s, exact_i = knn(E, 5, project=None)
    # in a cluster of ~100 near-ties the order may change, but what it finds is as close
    assert np.quantile(exact_s[:, 0] - sims[:, 0], 0.99) < 0.02
    assert (idx != np.arange(len(E))[:, None]).all()
    # the similarities returned are the full vectors' own
    np.testing.assert_allclose(sims, np.einsum("nd,nkd->nk", E, E[idx]), rtol=1e-4, atol=1e-5)


def test_groups_join_pairs_transitively_and_identical_bytes():
    g = groups_from_pairs(6, [(0, 2, 0.9), (2, 4, 0.8)], base=np.array([0, 1, 2, 3, 4, 1]))
    assert g[0] == g[2] == g[4] and g[1] == g[5]
    assert len({g[0], g[1], g[3]}) == 3
    assert g.tolist() == [0, 1, 0, 2, 0, 1]  # ids in order of first appearance


def test_duplicate_pairs_find_copies_not_neighbours():
    """Copies (the same vector plus small noise) pair up; a dense class of distinct rows does not."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 64))
    X = np.concatenate([c + 0.6 * rng.normal(size=(40, 64)) for c in centres])
    X = np.concatenate([X, X[:10] + 0.05 * rng.normal(size=(10, 64))])
    pairs, r = duplicate_pairs(embed(X.astype(np.float32), pca=None).vectors)
    found = {(a, b) for a, b, _ in pairs}
    assert {(i, 200 + i) for i in range(10)} <= found
    assert len(found) == 10
    assert r.shape == (210,)


# ---------------------------------------------------------------------- the verb
def test_doctor_flags_the_mislabelled_image_and_the_leak(dirty, cache_dir, tmp_path, capsys):
    out = tmp_path / "doc"
    rc = doctor(dirty["train"], "--val", dirty["val"], "--out", out, "--cache", cache_dir, *LITE0)
    assert rc == 0
    text = capsys.readouterr().out
    assert "LEAK" in text and str(dirty["leak"]) in text
    assert "likely label errors" in text and "beagle-filed-as-golden" in text
    js = json.loads((out / "doctor.json").read_text())
    assert js["format"] == DOCTOR_FORMAT and js["format_version"] == 1
    issue = js["label_issues"][0]
    assert issue["path"] == str(dirty["wrong"])
    assert issue["given_label"] == dirty["classes"][3]
    assert issue["suggested_label"] == dirty["classes"][2]  # beagle
    assert issue["given_prob"] < 0.2 < issue["top_prob"]
    leaks = [g for g in js["duplicate_groups"] if g["leak"]]
    assert len(leaks) == 1 and set(leaks[0]["paths"]) == {str(dirty["src"]), str(dirty["leak"])}
    assert js["summary"]["leaks"] == 1 and js["summary"]["n_train"] == 48
    with open(out / "doctor.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CSV_COLUMNS
    by = {(r["path"], r["issue"]): r for r in rows}
    assert issue["top_prob"] >= 0.5  # a confident suggestion: relabelled by default
    assert by[(str(dirty["wrong"]), "label")]["action"] == "relabel"
    assert by[(str(dirty["wrong"]), "label")]["suggested_label"] == dirty["classes"][2]
    assert by[(str(dirty["src"]), "leak")]["action"] == "exclude"  # the training copy
    assert by[(str(dirty["leak"]), "leak")]["action"] == "keep"  # val is not ours to edit
    assert {r["action"] for r in rows} <= {"exclude", "relabel", "keep"}
    html = (out / "report.html").read_text()
    assert "LEAKS" in html and "Likely label errors" in html
    assert len(os.listdir(out / "doctor")) >= 3  # thumbnails of the findings
    # the output is ours: replaced only with --overwrite
    rc = doctor(dirty["train"], "--out", out, "--cache", cache_dir, *LITE0)
    assert rc == 2
    one_line_error(capsys, "already exists", "--overwrite")


def test_doctor_finds_an_outlier(woof_train, cache_dir, tmp_path, capsys):
    d = tmp_path / "data"
    shutil.copytree(woof_train, d)
    cls = sorted(os.listdir(d))[1]
    synthetic_image((224, 224), seed=3).save(d / cls / "noise.png")
    assert doctor(d, "--out", tmp_path / "doc", "--cache", cache_dir, *LITE0) == 0
    js = json.loads((tmp_path / "doc" / "doctor.json").read_text())
    assert [o["path"] for o in js["outliers"]] == [str(d / cls / "noise.png")]
    assert "outliers: 1" in capsys.readouterr().out


def test_doctor_user_errors(dirty, cache_dir, tmp_path, capsys):
    assert doctor(dirty["train"], "--folds", "1", "--cache", cache_dir, *LITE0) == 2
    one_line_error(capsys, "--folds 1", "--folds 2")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert doctor(dirty["train"], "--out", tmp_path / "mine", "--cache", cache_dir, *LITE0) == 2
    one_line_error(capsys, "did not write", "--out")
    assert doctor(tmp_path / "nope", "--cache", cache_dir, *LITE0) == 2
    one_line_error(capsys, "nope")
    for c in dirty["classes"][:2]:  # one image a class: nothing can be held out
        (tmp_path / "tiny" / c).mkdir(parents=True)
        src = sorted((dirty["train"] / c).iterdir())[1]
        shutil.copyfile(src, tmp_path / "tiny" / c / src.name)
    assert doctor(tmp_path / "tiny", "--cache", cache_dir, *LITE0) == 2
    one_line_error(capsys, "single image", "at least 2 images")


# ---------------------------------------------------------------------- corrections
def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in CSV_COLUMNS})


def test_exclude_and_relabel_change_the_training_set(dirty, cache_dir, tmp_path, capsys):
    fix = tmp_path / "fix.csv"
    _write_csv(fix, [
        {"path": str(dirty["wrong"]), "issue": "label", "suggested_label": dirty["classes"][2], "action": "relabel"},
        {"path": str(dirty["src"]), "issue": "leak", "action": "exclude"},
        {"path": str(dirty["leak"]), "split": "val", "action": "keep"},
    ])  # fmt: skip
    assert train(dirty["train"], tmp_path / "m", cache_dir, "--exclude", fix, "--no-doctor") == 0
    assert "1 left out, 1 relabelled" in capsys.readouterr().out
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    counts = man["training"]["per_class"]
    assert man["training"]["n_images"] == 47
    c = dirty["classes"]
    assert (counts[c[0]], counts[c[2]], counts[c[3]]) == (11, 12, 12)  # beagle back home


def test_exclude_errors_name_the_file_and_line(dirty, cache_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    _write_csv(bad, [{"path": "/elsewhere/x.jpg", "action": "exclude"}])
    assert train(dirty["train"], tmp_path / "m", cache_dir, "--exclude", bad) == 2
    one_line_error(capsys, "bad.csv line 2", "/elsewhere/x.jpg", "not in the data")
    _write_csv(bad, [{"path": str(dirty["wrong"]), "suggested_label": "cat", "action": "relabel"}])
    assert train(dirty["train"], tmp_path / "m", cache_dir, "--exclude", bad) == 2
    one_line_error(capsys, "line 2", "'cat'", "not a class")
    _write_csv(bad, [{"path": str(dirty["wrong"]), "action": "delete"}])
    assert train(dirty["train"], tmp_path / "m", cache_dir, "--exclude", bad) == 2
    one_line_error(capsys, "unknown action 'delete'", "exclude, relabel or keep")
    bad.write_text("file,what\na,b\n")
    assert train(dirty["train"], tmp_path / "m", cache_dir, "--exclude", bad) == 2
    one_line_error(capsys, "no column 'path' or 'action'")
    assert train(dirty["train"], tmp_path / "m", cache_dir, "--exclude", tmp_path / "none.csv") == 2
    one_line_error(capsys, "none.csv", "no such file")
    assert not (tmp_path / "m").exists()


def test_doctor_csv_fed_back_as_written(dirty, cache_dir, tmp_path, capsys):
    """The CSV doctor writes is accepted as it is by train --exclude (its val rows included).
    A near-duplicate within train (correct label) is listed with the default action ``keep``:
    both copies stay in the training set."""
    ridgeback = dirty["train"] / dirty["classes"][1]
    first = sorted(ridgeback.iterdir())[0]
    copy = ridgeback / "copy-within-train.jpg"
    reencode(first, copy)
    out = tmp_path / "doc"
    assert (
        doctor(dirty["train"], "--val", dirty["val"], "--out", out, "--cache", cache_dir, *LITE0)
        == 0
    )
    with open(out / "doctor.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    dup = {r["path"]: r for r in rows if r["issue"] == "duplicate"}
    assert {str(first), str(copy)} <= set(dup)
    assert dup[str(first)]["group"] == dup[str(copy)]["group"]
    assert {r["action"] for r in dup.values()} == {"keep"}
    n_ex = len({r["path"] for r in rows if r["action"] == "exclude"})
    assert n_ex >= 1  # the training copy of the leak
    assert str(copy) not in {r["path"] for r in rows if r["action"] == "exclude"}
    relabel = {r["path"] for r in rows if r["action"] == "relabel"}
    assert str(dirty["wrong"]) in relabel  # the beagle, confidently suggested
    assert train(dirty["train"], tmp_path / "m", cache_dir, "--exclude", out / "doctor.csv") == 0
    assert f"{n_ex} left out, {len(relabel)} relabelled" in capsys.readouterr().out
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert man["training"]["n_images"] == 49 - n_ex
    c, counts = dirty["classes"], man["training"]["per_class"]
    assert (len(relabel), n_ex) == (1, 1)  # the beagle; the leak's training copy
    assert (counts[c[0]], counts[c[1]], counts[c[2]], counts[c[3]]) == (11, 13, 12, 12)


def test_default_actions_follow_the_finding():
    """Confident label suggestions are relabelled, the others excluded; copies within one side
    are kept; a leak's training copy is excluded, its validation copy kept."""
    from stackvision.doctor import Diagnosis
    from stackvision.doctor_output import RELABEL_PROB, csv_rows

    paths = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "v.jpg"]
    d = Diagnosis(paths, ["train"] * 5 + ["val"], ["x", "x", "y", "y", "y", "y"], ["x", "y"])
    for path, top in (("a.jpg", RELABEL_PROB), ("b.jpg", RELABEL_PROB - 0.01)):
        d.label_issues.append({"row": 0, "path": path, "given_label": "x", "suggested_label": "y",
                               "given_prob": 0.05, "top_prob": top})  # fmt: skip
    d.groups = [
        {"group": 0, "paths": ["e.jpg", "v.jpg"], "splits": ["train", "val"],
         "labels": ["y", "y"], "score": 0.6, "leak": True, "identical": False},
        {"group": 1, "paths": ["c.jpg", "d.jpg"], "splits": ["train", "train"],
         "labels": ["y", "y"], "score": 0.5, "leak": False, "identical": False},
    ]  # fmt: skip
    act = {(r["path"], r["issue"]): r["action"] for r in csv_rows(d)}
    assert act == {
        ("e.jpg", "leak"): "exclude", ("v.jpg", "leak"): "keep",
        ("a.jpg", "label"): "relabel", ("b.jpg", "label"): "exclude",
        ("c.jpg", "duplicate"): "keep", ("d.jpg", "duplicate"): "keep",
    }  # fmt: skip


def test_finetune_exclude_leaves_out_and_relabels_rows(
    flowers_small, heldout, tmp_path, capsys, one_torch_thread
):
    """finetune --exclude: the model is trained on the corrected listing (1 tiny epoch, 64 px)."""
    daisy = sorted((flowers_small / "daisy").iterdir())
    sun = sorted((flowers_small / "sunflower").iterdir())
    fix = tmp_path / "fix.csv"
    _write_csv(fix, [
        {"path": str(sun[0]), "issue": "duplicate", "action": "exclude"},
        {"path": str(sun[1]), "issue": "leak", "action": "exclude"},
        {"path": str(daisy[0]), "issue": "label", "suggested_label": "tulip", "action": "relabel"},
        {"path": str(daisy[1]), "issue": "label", "suggested_label": "sunflower", "action": "keep"},
    ])  # fmt: skip
    out = tmp_path / "ft"
    args = ["finetune", str(flowers_small), "--val", str(heldout), "--exclude", str(fix),
            "--out", str(out), "--head-epochs", "1", "--epochs", "0", "--input-size", "64",
            "--batch-size", "8", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert "2 left out, 1 relabelled" in capsys.readouterr().out
    tr = json.loads((out / "manifest.json").read_text())["training"]
    assert tr["n_images"] == 28  # 30 - 2: --val keeps every listed row for training
    assert tr["per_class"] == {"daisy": 9, "sunflower": 8, "tulip": 11}
    bad = tmp_path / "bad.csv"
    _write_csv(bad, [{"path": "/elsewhere/x.jpg", "action": "exclude"}])
    assert main([*args[:5], str(bad), "--out", str(tmp_path / "ft2"), *args[8:], "-q"]) == 2
    one_line_error(capsys, "bad.csv line 2", "not in the data")
    assert not (tmp_path / "ft2").exists()


# ---------------------------------------------------------------------- train integration
def test_train_report_has_a_doctor_section_unless_no_doctor(dirty, cache_dir, tmp_path, capsys):
    out = tmp_path / "m"
    assert train(dirty["train"], out, cache_dir, "--val", dirty["val"], "--folds", "4") == 0
    text = capsys.readouterr().out
    assert "data doctor: 1 likely label error(s), 1 train/val leak(s)" in text
    assert "LEAKS" in text
    html = (out / "report" / "report.html").read_text()
    assert "id='doctor'" in html or 'id="doctor"' in html
    assert "beagle-filed-as-golden" in html
    assert (out / "report" / "doctor.csv").is_file()
    assert train(dirty["train"], tmp_path / "m2", cache_dir, "--no-doctor") == 0
    html = (tmp_path / "m2" / "report" / "report.html").read_text()
    assert "Data doctor" not in html


def test_group_duplicates_keeps_copies_in_one_fold(woof_train, cache_dir, tmp_path):
    from stackvision import Runtime, StackedClassifier
    from stackvision.data import from_folder

    d = tmp_path / "data"
    shutil.copytree(woof_train, d)
    cls = sorted(os.listdir(d))
    copies = []
    for c in cls:
        src = sorted((d / c).iterdir())[0]
        reencode(src, d / c / "copy.jpg")
        copies.append((str(src), str(d / c / "copy.jpg")))
    lst = from_folder(str(d))
    rt = Runtime(cache_dir=cache_dir, progress=False)
    for on in (False, True):
        m = StackedClassifier("lite0", folds=4, tta="none", group_duplicates=on, runtime=rt)
        m.fit(lst.paths, lst.labels)
        pos = {p: i for i, p in enumerate(m.train_paths_)}
        together = [
            any({pos[a], pos[b]} <= set(va.tolist()) for _, va in m.splits_) for a, b in copies
        ]
        if on:
            assert all(together)
            assert m.metrics_["duplicates"]["split_groups"] == len(lst.paths) - len(copies)
        else:
            assert not all(together)  # 4 folds: by chance all 4 pairs in one fold is ~1.6%
    X = m._features_cache.stacked()
    g = near_duplicate_groups(X)
    assert all(g[pos[a]] == g[pos[b]] for a, b in copies)


def test_doctor_from_shards_streams_and_names_rows_by_their_files(
    dirty, cache_dir, tmp_path, capsys
):
    shards = tmp_path / "shards"
    args = ["extract", str(dirty["train"]), "--backbones", "lite0", "--tta", "none"]
    assert (
        main(
            [
                *args,
                "--cache",
                cache_dir,
                "--export-shards",
                str(shards),
                "--shard-rows",
                "20",
                "-q",
            ]
        )
        == 0
    )
    out = tmp_path / "doc"
    assert doctor(dirty["train"], "--from-shards", shards, "--out", out, "-q") == 0
    js = json.loads((out / "doctor.json").read_text())
    assert js["label_issues"][0]["path"] == str(dirty["wrong"])
    assert js["label_issues"][0]["suggested_label"] == dirty["classes"][2]
    assert "streamed" in js["stats"]["out_of_fold"] and "3 shard(s)" in js["stats"]["search"]
    # without DATA the rows are named by their image hash
    assert doctor("--from-shards", shards, "-q") == 0
    assert "shard row" in capsys.readouterr().out
    assert doctor("--from-shards", shards, "--val", dirty["val"], "-q") == 2
    one_line_error(capsys, "--from-shards", "--val-shards")
    assert doctor(dirty["train"], "--val-shards", shards, "-q") == 2
    one_line_error(capsys, "--val-shards", "--from-shards")


def test_doctor_from_shards_finds_the_leak_in_the_validation_shards(
    dirty, cache_dir, tmp_path, capsys
):
    """The shard path searches the validation set's shards for leaks, as --val does in memory."""
    sets = {}
    for side in ("train", "val"):
        sets[side] = tmp_path / f"{side}-shards"
        run = ["extract", str(dirty[side]), "--backbones", "lite0", "--tta", "none", "--cache"]
        run += [cache_dir, "--export-shards", str(sets[side]), "--shard-rows", "20", "-q"]
        assert main(run) == 0
    capsys.readouterr()
    out = tmp_path / "doc"
    args = [dirty["train"], "--from-shards", sets["train"], "--val-shards", sets["val"]]
    assert doctor(*args, "--val", dirty["val"], "--out", out) == 0
    printed = capsys.readouterr().out
    assert "LEAK" in printed and str(dirty["leak"]) in printed
    js = json.loads((out / "doctor.json").read_text())
    leaks = [g for g in js["duplicate_groups"] if g["leak"]]
    assert len(leaks) == 1 and {str(dirty["src"]), str(dirty["leak"])} == set(leaks[0]["paths"])
    assert sorted(leaks[0]["splits"]) == ["train", "val"]
    assert js["summary"]["n_val"] == len(images_of(dirty["val"]))
    # without --val the validation rows are named by their image hash
    assert doctor("--from-shards", sets["train"], "--val-shards", sets["val"]) == 0
    printed = capsys.readouterr().out
    assert "LEAK" in printed and "val shard row" in printed
    # shards of other features are refused, naming the folder
    other = tmp_path / "other"
    run = ["extract", str(dirty["val"]), "--backbones", "lite1", "--tta", "none", "--cache"]
    assert main([*run, cache_dir, "--export-shards", str(other), "-q"]) == 0
    capsys.readouterr()
    assert doctor("--from-shards", sets["train"], "--val-shards", other, "-q") == 2
    one_line_error(capsys, str(other), "same --backbones")
