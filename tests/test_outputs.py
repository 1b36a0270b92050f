"""Nothing a command did not write is ever deleted or overwritten; nonsense arguments are refused
before any work; odd input files are refused with a reason. Everything through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from stackvision.cli import main
from stackvision.errors import StackvisionError
from stackvision.models import load_model

from .cli_helpers import one_line_error, train
from .conftest import ROOT, synthetic_image


@pytest.fixture(scope="module")
def model(woof_train, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "model"
    assert train(woof_train, out, cache_dir) == 0
    return out


def one_image(woof_val):
    return next(p for p in sorted(woof_val.rglob("*.JPEG")))


# ---------------------------------------------------------------------- train --out
def test_out_on_a_folder_holding_a_foreign_file_is_refused(woof_train, cache_dir, tmp_path, capsys):
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):  # --overwrite never applies to what we did not write
        assert train(woof_train, important, cache_dir, *extra) == 2
        one_line_error(capsys, "did not write", "never replaced")
        assert (important / "thesis.txt").read_text() == "precious"
        assert sorted(os.listdir(important)) == ["thesis.txt"]


def test_out_on_the_data_folder_inside_it_or_around_it_is_refused(
    woof_train, cache_dir, tmp_path, capsys
):
    before = sorted(p.relative_to(woof_train) for p in woof_train.rglob("*"))
    cls = sorted(os.listdir(woof_train))[0]
    for out in (woof_train, woof_train / cls / "model", woof_train.parent):
        assert train(woof_train, out, cache_dir, "--overwrite") == 2
        one_line_error(capsys, "input")
    assert sorted(p.relative_to(woof_train) for p in woof_train.rglob("*")) == before


def test_out_on_root_home_or_the_cache_is_refused(woof_train, cache_dir, tmp_path, capsys):
    assert train(woof_train, "/", cache_dir, "--overwrite") == 2
    one_line_error(capsys, "root folder")
    assert train(woof_train, os.path.expanduser("~"), cache_dir, "--overwrite") == 2
    one_line_error(capsys, "home folder")
    assert train(woof_train, os.path.join(cache_dir, "m"), cache_dir) == 2
    one_line_error(capsys, "feature cache")


def test_an_out_that_cannot_be_written_is_refused_before_any_work(
    woof_train, woof_val, model, tmp_path, capsys
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    fresh_cache = tmp_path / "cache"
    cases = [(a_file / "model", "is a file, not a folder")]
    if os.path.isdir("/proc/self"):  # a folder nobody can create entries in, root included
        cases.append(("/proc/stackvision-test/model", "cannot be written"))
    if os.geteuid() != 0:  # permissions bind only other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "model", "Permission denied"))
    for out, needle in cases:
        assert train(woof_train, out, str(fresh_cache)) == 2
        one_line_error(capsys, "cannot be written", needle)
        assert not fresh_cache.exists()  # refused before a single image was read
    # the other verbs that write an --out, and the library's own save
    for argv in (
        ["export", str(model), "--out", str(a_file / "m.onnx")],
        ["predict", str(model), str(woof_val), "--out", str(a_file / "p.csv")],
        ["evaluate", str(model), str(woof_val), "--out", str(a_file / "ev")],
    ):
        assert main(argv) == 2
        one_line_error(capsys, "is a file, not a folder")
    with pytest.raises(StackvisionError, match="is a file, not a folder"):
        load_model(model).save(str(a_file / "m2"))
    assert a_file.read_text() == "keep"


def test_an_existing_model_is_replaced_only_with_overwrite(woof_train, cache_dir, tmp_path, capsys):
    out = tmp_path / "m"
    assert train(woof_train, out, cache_dir) == 0
    assert json.loads((out / "manifest.json").read_text())["folds"] == 2
    assert main(["train", str(woof_train), "--out", str(out), "--backbones", "lite0",
                 "--cache", cache_dir, "-q", "--folds", "3"]) == 2  # fmt: skip
    one_line_error(capsys, "--overwrite")
    assert json.loads((out / "manifest.json").read_text())["folds"] == 2
    assert main(["train", str(woof_train), "--out", str(out), "--backbones", "lite0",
                 "--cache", cache_dir, "-q", "--folds", "3", "--overwrite"]) == 0  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["folds"] == 3
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp or old folder left


CRASH = textwrap.dedent(
    """
    import os, signal, sys
    import stackvision.report as report
    from stackvision.cli import main

    def crash(*a, **k):  # the process dies while the new model is half written
        if {hard}:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("disk full")

    report.write_report = crash
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("hard", [True, False], ids=["sigkill", "exception"])
def test_a_crash_while_replacing_leaves_the_old_model_loadable(
    model, woof_train, woof_val, cache_dir, tmp_path, hard
):
    out = tmp_path / "m"
    shutil.copytree(model, out)
    before = (out / "weights.safetensors").read_bytes()
    p = subprocess.run(
        [sys.executable, "-c", CRASH.format(hard=hard), "train", str(woof_train), "--out", str(out),
         "--backbones", "lite0", "--folds", "3", "--cache", cache_dir, "-q", "--overwrite"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode != 0
    assert (out / "weights.safetensors").read_bytes() == before
    old = load_model(str(out), cache_dir=cache_dir)
    assert old.get_params()["folds"] == 2 if hasattr(old, "get_params") else old.folds == 2
    proba = old.predict_proba([str(one_image(woof_val))])
    np.testing.assert_allclose(proba.sum(), 1.0, atol=1e-5)
    if not hard:  # an orderly failure also cleans up its temporary folder
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


# ---------------------------------------------------------------------- every other verb
def test_predict_out_never_replaces_a_foreign_file(model, woof_val, cache_dir, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,breed\nabc,beagle\n")
    args = ["predict", str(model), str(one_image(woof_val)), "--cache", cache_dir, "-q"]
    for extra in ([], ["--overwrite"]):
        assert main([*args, "--out", str(labels), *extra]) == 2
        one_line_error(capsys, "did not write")
        assert labels.read_text() == "id,breed\nabc,beagle\n"
    preds = tmp_path / "preds.csv"
    assert main([*args, "--out", str(preds)]) == 0
    first = preds.read_text()
    assert main([*args, "--out", str(preds), "--top-k", "2"]) == 2
    one_line_error(capsys, "--overwrite")
    assert preds.read_text() == first
    assert main([*args, "--out", str(preds), "--top-k", "2", "--overwrite"]) == 0
    assert preds.read_text().splitlines()[0] == "path,class_1,prob_1,class_2,prob_2"
    folder = ["predict", str(model), str(woof_val), "--cache", cache_dir, "-q"]
    assert main([*folder, "--out", str(woof_val / "x.csv")]) == 2  # into the input folder
    one_line_error(capsys, "input")
    assert not (woof_val / "x.csv").exists()


def test_evaluate_out(model, woof_val, cache_dir, tmp_path, capsys):
    args = ["evaluate", str(model), str(woof_val), "--cache", cache_dir, "-q"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "a.txt").write_text("keep")
    assert main([*args, "--out", str(foreign), "--overwrite"]) == 2
    one_line_error(capsys, "did not write")
    assert (foreign / "a.txt").read_text() == "keep"
    assert main([*args, "--out", str(model), "--overwrite"]) == 2  # the model it reads
    one_line_error(capsys, "input")
    ev = tmp_path / "ev"
    assert main([*args, "--out", str(ev)]) == 0
    assert json.loads((ev / "manifest.json").read_text())["format"] == "stackvision-evaluation"
    assert main([*args, "--out", str(ev)]) == 2
    one_line_error(capsys, "--overwrite")
    assert main([*args, "--out", str(ev), "--overwrite"]) == 0
    assert (ev / "report" / "report.html").is_file()


def test_export_out(model, tmp_path, capsys):
    foreign = tmp_path / "model.onnx"
    foreign.write_bytes(b"not ours")
    assert main(["export", str(model), "--out", str(foreign), "--overwrite"]) == 2
    one_line_error(capsys, "did not write")
    assert foreign.read_bytes() == b"not ours"
    ours = tmp_path / "ours.onnx"
    assert main(["export", str(model), "--out", str(ours), "--no-check"]) == 0
    assert main(["export", str(model), "--out", str(ours), "--no-check"]) == 2
    one_line_error(capsys, "--overwrite")
    assert main(["export", str(model), "--out", str(ours), "--no-check", "--overwrite"]) == 0


def test_augment_preview_out(woof_train, tmp_path, capsys):
    photo = tmp_path / "holiday.png"
    synthetic_image().save(photo)
    before = photo.read_bytes()
    args = ["augment-preview", str(woof_train), "--rows", "1", "--per-image", "1", "-q"]
    assert main([*args, "--out", str(photo), "--overwrite"]) == 2
    one_line_error(capsys, "did not write")
    assert photo.read_bytes() == before
    grid = tmp_path / "grid.png"
    assert main([*args, "--out", str(grid)]) == 0
    assert main([*args, "--out", str(grid)]) == 2
    one_line_error(capsys, "--overwrite")
    assert main([*args, "--out", str(grid), "--overwrite"]) == 0


def test_finetune_and_ensemble_out(model, woof_train, woof_val, cache_dir, tmp_path, capsys):
    foreign = tmp_path / "ft"
    foreign.mkdir()
    (foreign / "a.txt").write_text("keep")
    ft = ["finetune", str(woof_train), "--epochs", "1", "--head-epochs", "0", "-q"]
    assert main([*ft, "--out", str(foreign), "--overwrite"]) == 2
    one_line_error(capsys, "did not write")
    work = tmp_path / "new.work"  # the checkpoint folder beside --out holds a foreign file
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    for extra in ([], ["--restart"]):
        assert main([*ft, "--out", str(tmp_path / "new"), *extra]) == 2
        one_line_error(capsys, "did not write", "mine.txt")
        assert (work / "mine.txt").read_text() == "keep"
    ens = ["ensemble", str(model), str(model), "--data", str(woof_val), "--cache", cache_dir]
    assert main([*ens, "--out", str(model), "--overwrite", "-q"]) == 2  # a member is an input
    one_line_error(capsys, "input")
    assert (foreign / "a.txt").read_text() == "keep"


def test_export_shards_never_writes_into_a_foreign_folder(woof_train, cache_dir, tmp_path, capsys):
    foreign = tmp_path / "feats"
    foreign.mkdir()
    (foreign / "shard-00000").mkdir()
    (foreign / "shard-00000" / "mine.txt").write_text("keep")
    args = ["extract", str(woof_train), "--backbones", "lite0", "--tta", "none", "-q"]
    assert main([*args, "--cache", cache_dir, "--export-shards", str(foreign), "--overwrite"]) == 2
    one_line_error(capsys, "--export-shards", "did not write")
    assert (foreign / "shard-00000" / "mine.txt").read_text() == "keep"


# ---------------------------------------------------------------------- arguments, before any work
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["predict", "M", "x.jpg", "--top-k", "-1"], "--top-k must be an integer >= 1"),
        (["predict", "M", "x.jpg", "--top-k", "0"], "--top-k must be an integer >= 1"),
        (["train", "D", "--out", "o", "--batch-size", "0"], "--batch-size must be"),
        (["train", "D", "--out", "o", "--workers", "-2"], "--workers must be"),
        (
            ["train", "D", "--out", "o", "--head-param", "C=-1"],
            "--head-param C must be a number > 0",
        ),
        (
            ["train", "D", "--out", "o", "--head-param", "C=0"],
            "--head-param C must be a number > 0",
        ),
        (["train", "D", "--out", "o", "--head", "mlp", "--head-param", "dropout=1.5"], "dropout"),
        (["train", "D", "--out", "o", "--head-param", "Cc=1"], "did you mean 'C'"),
        (["extract", "D", "--shard-rows", "0"], "--shard-rows must be"),
        (["export", "M", "--out", "m.onnx", "--opset", "5"], "--opset must be an integer >= 13"),
        (["export", "M", "--out", "m.onnx", "--opset", "99"], "<= 20"),
        (["serve", "M", "--max-batch", "0"], "--max-batch must be"),
        (["serve", "M", "--max-upload-mb", "0"], "--max-upload-mb must be"),
        (["augment-preview", "D", "--out", "g.png", "--rows", "0"], "--rows must be"),
    ],
)
def test_nonsense_arguments_are_refused_before_any_work(argv, needle, capsys):
    assert main(argv) == 2  # M, D and x.jpg do not exist: no work was attempted
    one_line_error(capsys, needle)


def test_estimator_arguments_are_refused_before_any_work(woof_train, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["train", str(woof_train), "--out", str(out), "--folds", "-1", "-q"]) == 2
    one_line_error(capsys, "--folds")
    assert not out.exists()
    for verb in (["train", str(woof_train), "--out", str(out)], ["extract", str(woof_train)]):
        assert main([*verb, "--backbones", " , ", "-q"]) == 2  # not the default stack
        one_line_error(capsys, "--backbones ' , ' names no backbone")
    assert not out.exists()


def test_cache_that_is_a_file_is_refused(woof_train, tmp_path, capsys):
    f = tmp_path / "cache"
    f.write_text("x")
    assert main(["extract", str(woof_train), "--cache", str(f), "-q"]) == 2
    one_line_error(capsys, "--cache", "is a file")


def test_a_cache_that_cannot_be_written_is_refused_before_any_work(
    woof_train, model, tmp_path, capsys, monkeypatch
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    places = [str(a_file / "cache")]
    if os.path.isdir("/proc/self"):
        places.append("/proc/stackvision-test-cache")
    for place in places:
        for argv in (["extract", str(woof_train), "--cache", place, "-q"],
                     ["predict", str(model), str(woof_train), "--cache", place, "-q"]):  # fmt: skip
            assert main(argv) == 2
            one_line_error(capsys, f"cannot write the feature cache {place}", "--cache")
        # the default cache comes from $STACKVISION_CACHE (or the user's cache folder)
        monkeypatch.setenv("STACKVISION_CACHE", place)
        assert main(["extract", str(woof_train), "-q"]) == 2
        one_line_error(capsys, "cannot write the feature cache", "$STACKVISION_CACHE")
    assert a_file.read_text() == "keep"


# ---------------------------------------------------------------------- odd input files
def test_device_and_fifo_named_like_images_are_listed_not_read(
    model, woof_val, cache_dir, tmp_path
):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copyfile(one_image(woof_val), d / "good.jpg")
    os.symlink("/dev/zero", d / "zero.jpg")
    os.mkfifo(d / "pipe.jpg")
    p = subprocess.run(
        [sys.executable, "-m", "stackvision.cli", "predict", str(model), str(d), "--cache",
         cache_dir, "-q"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "zero.jpg: a character device, not a regular file" in p.stderr
    assert "pipe.jpg: a named pipe (FIFO), not a regular file" in p.stderr
    rows = p.stdout.strip().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(d / "good.jpg"))


def _csv_case(woof_train, tmp_path, text: str, encoding: str):
    files = sorted(woof_train.rglob("*.JPEG"))[:4]
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for f in files:
        shutil.copyfile(f, images / f.name)
    body = text.format(a=files[0].stem, b=files[1].stem, c=files[2].stem, d=files[3].stem)
    path = tmp_path / "labels.csv"
    path.write_bytes(body.encode(encoding))
    return path, images


def test_utf16_labels_csv_is_read(woof_train, cache_dir, tmp_path, capsys):
    csv_path, images = _csv_case(
        woof_train, tmp_path, "id,breed\n{a},beagle\n{b},beagle\n{c},dingo\n{d},dingo\n", "utf-16"
    )
    assert main(["extract", "--labels", str(csv_path), "--images", str(images), "--backbones",
                 "lite0", "--tta", "none", "--cache", cache_dir, "-q"]) == 0  # fmt: skip
    assert "4" in capsys.readouterr().out


def test_latin1_labels_csv_gets_a_clear_error(woof_train, cache_dir, tmp_path, capsys):
    csv_path, images = _csv_case(
        woof_train, tmp_path, "id,breed\n{a},b\xe9agle\n{b},b\n{c},d\n{d},d\n", "latin-1"
    )
    assert main(["extract", "--labels", str(csv_path), "--images", str(images),
                 "--cache", cache_dir, "-q"]) == 2  # fmt: skip
    one_line_error(capsys, "labels.csv is not UTF-8", "0xe9", "save it as UTF-8")


def test_huge_csv_field_gets_a_clear_error(woof_train, cache_dir, tmp_path, capsys):
    big = "x" * 200_000
    csv_path, images = _csv_case(
        woof_train, tmp_path, 'id,breed\n{a},"' + big + '"\n{b},b\n{c},d\n{d},d\n', "utf-8"
    )
    assert main(["extract", "--labels", str(csv_path), "--images", str(images),
                 "--cache", cache_dir, "-q"]) == 2  # fmt: skip
    one_line_error(capsys, "labels.csv line", "field larger than field limit", "quote")


def test_partial_kaggle_csv_goes_on_with_a_flag(woof_train, cache_dir, tmp_path, capsys):
    """A labels.csv listing more ids than were downloaded: refused by default, naming the flag;
    with --skip-missing-images the rows with files train and the rest are listed as problems."""
    images = tmp_path / "images"
    images.mkdir()
    rows = ["id,breed"]
    for cls in sorted(os.listdir(woof_train))[:2]:
        for f in sorted(os.listdir(woof_train / cls))[:4]:
            shutil.copyfile(woof_train / cls / f, images / f)
            rows.append(f"{f.rsplit('.', 1)[0]},{cls}")
    rows += ["never_downloaded_1,x", "never_downloaded_2,y"]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    args = ["--labels", str(csv_path), "--images", str(images)]
    out = tmp_path / "m"
    assert train("", out, cache_dir, *args) == 2
    one_line_error(capsys, "2 row(s)", "--skip-missing-images")
    assert train("", out, cache_dir, *args, "--skip-missing-images") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 8
    missing = [p for p in metrics["problems"] if "no image file" in p["reason"]]
    assert sorted(os.path.basename(p["path"]) for p in missing) == [
        "never_downloaded_1",
        "never_downloaded_2",
    ]
    assert "2 file(s) left out" in capsys.readouterr().out
