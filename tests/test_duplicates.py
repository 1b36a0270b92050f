"""Duplicates never inflate a score (issue 11, item 2): a symlink loop adds no rows, identical
bytes stay on one side of every split, the same bytes under two labels is a listed problem."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from stackvision.data import from_folder
from stackvision.duplicates import find_duplicates
from stackvision.validation import holdout_split, kfold_splits

from .cli_helpers import one_line_error, train


def _copy(woof_train, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(woof_train, d)
    return d, sorted(os.listdir(d))


def test_a_symlink_loop_adds_no_rows(woof_train, cache_dir, tmp_path):
    d, classes = _copy(woof_train, tmp_path)
    os.symlink(d / classes[0], d / classes[0] / "loop")  # the class folder inside itself
    os.symlink("..", d / classes[1] / "up-and-back")  # the data root inside a class
    listing = from_folder(str(d))
    assert len(listing) == 48
    assert len(set(map(os.path.realpath, listing.paths))) == 48
    assert train(d, tmp_path / "model", cache_dir) == 0
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["n_images"] == 48
    assert metrics["duplicates"]["groups"] == 0


def test_identical_copies_across_classes_are_listed_and_refused_under_strict(
    woof_train, cache_dir, tmp_path, capsys
):
    d, classes = _copy(woof_train, tmp_path)
    src = sorted((d / classes[0]).iterdir())[0]
    copy = d / classes[1] / "copy-of-a.JPEG"
    shutil.copyfile(src, copy)
    assert train(d, tmp_path / "model", cache_dir) == 0
    out = capsys.readouterr().out
    assert f"same bytes as {src}, labelled '{classes[0]}' and '{classes[1]}'" in out
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["n_images"] == 47  # both copies left out
    assert sorted(p["path"] for p in metrics["problems"]) == sorted([str(src), str(copy)])
    assert metrics["duplicates"]["label_conflicts"] == 2
    assert train(d, tmp_path / "strict", cache_dir, "--strict") == 2
    one_line_error(capsys, "same bytes as", "labelled", "--strict")


def test_copies_in_one_class_are_reported_and_share_a_fold(woof_train, cache_dir, tmp_path, capsys):
    d, classes = _copy(woof_train, tmp_path)
    for i, src in enumerate(sorted((d / classes[2]).iterdir())[:3]):
        for k in range(3):
            shutil.copyfile(src, d / classes[2] / f"copy{k}-{i}.JPEG")
    assert train(d, tmp_path / "model", cache_dir) == 0
    assert "duplicates: 3 set(s) of identical images (12 files)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["n_images"] == 57
    dup = metrics["duplicates"]
    assert (dup["groups"], dup["files"], dup["extra_copies"]) == (3, 12, 9)
    assert all(len(s) == 4 for s in dup["sets"])
    report = (tmp_path / "model" / "report" / "report.html").read_text()
    assert "Identical images (3 set(s)" in report


def _groups_never_straddle(groups, splits):
    for tr, va in splits:
        assert not set(groups[tr]) & set(groups[va])
        assert len(tr) + len(va) == len(groups)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splits_keep_identical_images_on_one_side(seed):
    rng = np.random.default_rng(seed)
    hashes = [f"h{i}" for i in range(40)] + [f"h{i}" for i in rng.integers(0, 40, 30)]
    y_of = {f"h{i}": i % 3 for i in range(40)}
    labels = [str(y_of[h]) for h in hashes]
    dups = find_duplicates([f"f{i}" for i in range(len(hashes))], hashes, labels)
    assert len(dups.keep) == len(hashes) and not dups.problems
    y = np.asarray([y_of[h] for h in hashes])
    _groups_never_straddle(dups.groups, kfold_splits(y, 5, seed, dups.groups))
    _groups_never_straddle(dups.groups, [holdout_split(y, 0.2, seed, dups.groups)])


def test_without_duplicates_the_splits_are_unchanged():
    y = np.arange(30) % 3
    plain, grouped = kfold_splits(y, 3, 0), kfold_splits(y, 3, 0, np.arange(30))
    for (a, b), (c, d) in zip(plain, grouped):
        assert (a == c).all() and (b == d).all()
    assert all((a == b).all() for a, b in zip(holdout_split(y, 0.2), holdout_split(y, 0.2, 0, np.arange(30))))  # fmt: skip


def test_a_repeated_csv_id_is_one_group(woof_train, cache_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for c in sorted(os.listdir(woof_train))[:2]:
        for f in sorted((woof_train / c).iterdir())[:6]:
            shutil.copyfile(f, images / f.name)
            rows.append(f"{f.stem},{c}\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("id,breed\n" + "".join(rows) + rows[0] + rows[0])
    out = tmp_path / "model"
    assert train(labels, out, cache_dir, "--images", images) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 14
    assert metrics["duplicates"]["groups"] == 1 and metrics["duplicates"]["files"] == 3


def test_fine_tuning_hold_out_and_ensemble_folds_keep_copies_together(flowers_small, tmp_path):
    """Fine-tuning's early-stopping hold-out and the ensemble's out-of-fold split group identical
    files too: a copy on the validation side would be an image the network trained on."""
    from dataclasses import replace as dc_replace

    from stackvision.backbones import resolve
    from stackvision.duplicates import content_groups
    from stackvision.finetune import FineTunedClassifier
    from stackvision.validation import kfold_splits

    paths, labels = [], []
    for cls in sorted(os.listdir(flowers_small)):
        for f in sorted(os.listdir(flowers_small / cls))[:4]:
            for k in range(3):  # each image three times, under three names
                copy = tmp_path / f"{cls}-{k}-{f}"
                shutil.copyfile(flowers_small / cls / f, copy)
                paths.append(str(copy))
                labels.append(cls)
    ft = FineTunedClassifier("lite0", input_size=32, val_split=0.3, seed=1)
    ft.classes_ = sorted(set(labels))
    ft.preprocess_ = dc_replace(resolve("lite0").preprocess, input_size=32)
    (_, _, tpaths), (_, _, vpaths) = ft._training_data(paths, labels, None)
    stem = lambda p: os.path.basename(p).split("-", 2)[2]  # noqa: E731 - the original file
    assert vpaths and not {stem(p) for p in tpaths} & {stem(p) for p in vpaths}
    groups = content_groups(paths)
    assert len(set(groups)) == len(paths) // 3
    y = np.asarray([sorted(set(labels)).index(c) for c in labels])
    for tr, va in kfold_splits(y, 3, 0, groups):
        assert not set(groups[tr]) & set(groups[va])
