"""Listing folders and labels CSVs, and refusing data that cannot be trained on."""

from __future__ import annotations

import pytest

from stackvision.data import check_trainable, from_csv, from_folder, from_paths, load_labelled
from stackvision.errors import StackvisionError

from .conftest import synthetic_image


def _tree(root, spec):
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            synthetic_image(seed=i).save(root / cls / f"{cls}_{i}.jpg")
    return root


def test_folder_listing_sorted_with_labels(tmp_path):
    root = _tree(tmp_path / "d", {"b": 2, "a": 3})
    (root / "a" / "readme.txt").write_text("ignored")
    (root / "a" / "weird.xyz").write_text("?")
    ls = from_folder(str(root))
    assert ls.classes == ["a", "b"]
    assert ls.labels == ["a"] * 3 + ["b"] * 2
    assert [p.reason for p in ls.problems] == ["not an image file extension; skipped"]


def test_csv_kaggle_layout_ids_without_extension(tmp_path):
    imgs = tmp_path / "train"
    imgs.mkdir()
    for i in range(4):
        synthetic_image(seed=i).save(imgs / f"id{i}.jpg")
    csv = tmp_path / "labels.csv"
    csv.write_text("id,breed\nid0,pug\nid1,pug\nid2,boxer\nid3.jpg,boxer\n")
    ls = from_csv(str(csv), str(imgs))
    assert ls.labels == ["pug", "pug", "boxer", "boxer"]
    assert all(p.endswith(".jpg") for p in ls.paths)


def test_csv_relative_paths_and_column_detection(tmp_path):
    (tmp_path / "img" / "x").mkdir(parents=True)
    synthetic_image().save(tmp_path / "img" / "x" / "a.png")
    synthetic_image(seed=1).save(tmp_path / "img" / "x" / "b.png")
    csv = tmp_path / "meta.csv"
    csv.write_text("notes,filename,species\nhello,img/x/a.png,cat\nbye,img/x/b.png,dog\n")
    ls = load_labelled(str(csv))
    assert ls.labels == ["cat", "dog"]
    ls2 = from_csv(str(csv), id_col="filename", label_col="notes")
    assert ls2.labels == ["hello", "bye"]


def test_csv_errors_name_the_problem(tmp_path):
    (tmp_path / "imgs").mkdir()
    synthetic_image().save(tmp_path / "imgs" / "a.jpg")
    csv = tmp_path / "labels.csv"
    csv.write_text("id,breed\na,pug\nghost,pug\n")
    with pytest.raises(StackvisionError, match="ghost"):
        from_csv(str(csv), str(tmp_path / "imgs"))
    with pytest.raises(StackvisionError, match="column 'nope'"):
        from_csv(str(csv), str(tmp_path / "imgs"), id_col="nope")
    with pytest.raises(StackvisionError, match="not found"):
        from_csv(str(tmp_path / "missing.csv"))


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(StackvisionError, match="not found"):
        from_folder(str(tmp_path / "nope"))
    with pytest.raises(StackvisionError, match="no class subfolders"):
        from_folder(str(tmp_path))
    with pytest.raises(StackvisionError, match="input not found"):
        from_paths([str(tmp_path / "nope.jpg")])


def test_untrainable_data_is_refused():
    with pytest.raises(StackvisionError, match="only one class"):
        check_trainable(["a", "a", "a"])
    with pytest.raises(StackvisionError, match="fewer images than --folds 5.*'b' has 2"):
        check_trainable(["a"] * 6 + ["b"] * 2, folds=5)
    check_trainable(["a"] * 5 + ["b"] * 5, folds=5)


def test_csv_labels_with_control_characters_name_the_line(tmp_path):
    (tmp_path / "imgs").mkdir()
    for n in ("a", "b"):
        synthetic_image().save(tmp_path / "imgs" / f"{n}.jpg")
    csv = tmp_path / "labels.csv"
    csv.write_text('id,breed\na,pug\n"b","multi\nline"\n', newline="")
    with pytest.raises(StackvisionError, match=r"line 4: the label 'multi\\nline'.*\\n"):
        from_csv(str(csv), str(tmp_path / "imgs"))
    csv.write_text("id,breed\na,pug\nb\x00,pug\n")
    with pytest.raises(StackvisionError, match=r"line 3: the id 'b\\x00'"):
        from_csv(str(csv), str(tmp_path / "imgs"))


def test_csv_ids_outside_the_images_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    synthetic_image().save(tmp_path / "imgs" / "a.jpg")
    synthetic_image().save(tmp_path / "outside.jpg")
    csv = tmp_path / "labels.csv"
    csv.write_text("id,breed\na,pug\n../outside,boxer\n")
    with pytest.raises(StackvisionError, match="line 3: id '../outside' leads outside"):
        from_csv(str(csv), str(tmp_path / "imgs"))
    ls = from_csv(str(csv), str(tmp_path / "imgs"), allow_outside=True)
    assert ls.labels == ["pug", "boxer"]
    # default images folder = the CSV's: a path below it is inside
    csv.write_text("id,breed\nimgs/a,pug\noutside,boxer\n")
    assert from_csv(str(csv)).labels == ["pug", "boxer"]


def test_folds_advice_for_a_single_image_class():
    with pytest.raises(StackvisionError) as exc:
        check_trainable(["a"] * 6 + ["b"], folds=5)
    assert "--folds 0" in str(exc.value) and "--folds 2" not in str(exc.value)
    check_trainable(["a"] * 6 + ["b"], folds=0)


def test_absolute_ids_inside_the_images_folder_are_fine(tmp_path):
    (tmp_path / "imgs").mkdir()
    synthetic_image().save(tmp_path / "imgs" / "a.jpg")
    synthetic_image(seed=1).save(tmp_path / "imgs" / "b.jpg")
    csv = tmp_path / "labels.csv"
    csv.write_text(f"id,breed\n{tmp_path / 'imgs' / 'a.jpg'},pug\nb,boxer\n")
    assert from_csv(str(csv), str(tmp_path / "imgs")).labels == ["pug", "boxer"]
