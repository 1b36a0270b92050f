"""Every model kind records which images it was fitted on (``training_images.txt``), so that
``ensemble`` refuses to fit its combiners on a member's own training images and ``evaluate`` says
when its scores are not held-out scores. Through the CLI, on the session's models of each kind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stackvision.cli import main
from stackvision.errors import StackvisionError
from stackvision.model_dir import TRAINING_IMAGES, file_hashes, read_training_hashes
from stackvision.models import load_model

from .cli_helpers import one_line_error
from .conftest import KINDS


def _images(folder) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_records_its_training_images(kind, request, flowers_small, heldout):
    path = request.getfixturevalue(KINDS[kind][0])
    train = set(file_hashes(_images(flowers_small)))
    seen = read_training_hashes(str(path))
    assert seen and len(next(iter(seen))) == 32
    if KINDS[kind][1] == "stack":  # every image is in some fold's training part
        assert seen == train
    elif KINDS[kind][1] == "finetune":  # all but its own validation split (--val-split 0.3)
        assert seen < train and len(seen) == round(0.7 * len(train))
    else:  # the members' images and the held-out images the combiners were fitted on
        assert seen == train | set(file_hashes(_images(heldout)))
    # loading and saving again keeps the record
    again = load_model(str(path)).save(str(path) + "-again")
    assert read_training_hashes(again) == seen


def test_ensemble_refuses_a_members_training_images(
    stack_dir, ft_dir, flowers_small, cache_dir, tmp_path, capsys
):
    out = tmp_path / "ens"
    args = ["ensemble", str(stack_dir), str(ft_dir), "--data", str(flowers_small)]
    args += ["--out", str(out)]
    assert main([*args, "--cache", cache_dir, "-q"]) == 2
    one_line_error(
        capsys, "30 of the 30 images to fit the ensemble on were used to train member 'stack'"
    )
    assert not out.exists()


def test_evaluate_says_when_it_scores_training_images(
    stack_dir, flowers_small, heldout, cache_dir, tmp_path, capsys
):
    ev = tmp_path / "ev-train"
    assert main(["evaluate", str(stack_dir), str(flowers_small), "--out", str(ev),
                 "--cache", cache_dir, "-q"]) == 0  # fmt: skip
    assert "warning: 30 of the 30 images were used to train this model" in capsys.readouterr().err
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["training_overlap"] == {"n_images": 30, "of": 30}
    assert "were training images" in metrics["validation"]
    ev = tmp_path / "ev-heldout"
    assert main(["evaluate", str(stack_dir), str(heldout), "--out", str(ev),
                 "--cache", cache_dir, "-q"]) == 0  # fmt: skip
    assert "warning" not in capsys.readouterr().err
    assert "training_overlap" not in json.loads((ev / "metrics.json").read_text())


def test_a_model_without_the_record_and_a_damaged_record(stack_dir, tmp_path):
    import shutil

    old = tmp_path / "older-model"
    shutil.copytree(stack_dir, old)
    os.remove(old / TRAINING_IMAGES)  # as written before the record existed
    assert read_training_hashes(str(old)) is None
    assert load_model(str(old)).training_hashes_ is None
    (old / TRAINING_IMAGES).write_text("not a hash\n")
    with pytest.raises(StackvisionError, match="not a list of image hashes"):
        read_training_hashes(str(old))


def test_a_few_copies_of_training_images_are_left_out_of_the_ensembles_fit(
    stack_dir, ft_dir, flowers_small, heldout, cache_dir, tmp_path, capsys
):
    """Duplicates across splits are common in real data: a few are left out (and said), only
    a --data that is mostly a member's training set is refused."""
    import shutil

    data = tmp_path / "heldout-plus-two"
    shutil.copytree(heldout, data)
    for cls in sorted(os.listdir(flowers_small))[:2]:  # one training image of two classes,
        src = sorted((flowers_small / cls).iterdir())[0]  # copied under a new name
        shutil.copyfile(src, data / cls / f"copy-{src.name}")
    out = tmp_path / "ens"
    args = ["ensemble", str(stack_dir), str(ft_dir), "--data", str(data), "--out", str(out)]
    assert main([*args, "--method", "mean", "--cache", cache_dir]) == 0
    printed = capsys.readouterr()
    assert "copy-" in printed.out + printed.err  # the two are named among the files left out
    rows = json.loads((out / "comparison.json").read_text())  # members and combiners
    assert len(rows) >= 3 and all(r["n_images"] == 12 for r in rows), rows
    problems = json.loads((out / "metrics.json").read_text())["problems"]
    assert sorted(p["path"].rsplit("/", 1)[1][:5] for p in problems) == ["copy-", "copy-"]
    assert all("was trained on this image" in p["reason"] for p in problems)
