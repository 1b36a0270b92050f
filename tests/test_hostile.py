"""Hostile and odd inputs, through the CLI as a user meets them (issue 11): absurd aspect ratios,
decoder failures, huge files, non-UTF-8 names, control characters in labels, CSV ids leading
outside the images folder, file permissions of what is written."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import ImageFile

from stackvision.cli import main
from stackvision.preprocess import Preprocess

from .cli_helpers import one_line_error, train
from .conftest import ROOT
from .hostile_inputs import png_bytes, write_bytes_name


def cli(*args, env=None, timeout=300):
    """The real entry point in a subprocess, with a strict UTF-8 stdout/stderr, as in a
    en_US.UTF-8 terminal (C.UTF-8 would forgive lone surrogates)."""
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "stackvision.cli", *map(str, args)],
        capture_output=True,
        cwd=ROOT,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def model(woof_train, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "model"
    assert train(woof_train, out, cache_dir) == 0
    return out


def good_images(woof_val, n=2):
    return sorted(woof_val.rglob("*.JPEG"))[:n]


def predict(model, folder, cache_dir, capsys, *extra):
    out = folder.parent / f"{folder.name}-pred.csv"
    code = main(["predict", str(model), str(folder), "--cache", cache_dir, "--out", str(out)]
                + ["-q", *map(str, extra)])  # fmt: skip
    captured = capsys.readouterr()
    rows = list(csv.reader(out.open())) if code == 0 else []
    return code, captured.out + captured.err, rows


# ---------------------------------------------------------------------- 1. aspect ratios, memory
def test_extreme_aspect_ratio_is_a_listed_bad_image_not_575_mb(model, woof_val, cache_dir, tmp_path, capsys):  # fmt: skip
    d = tmp_path / "in"
    d.mkdir()
    for f in good_images(woof_val):
        shutil.copyfile(f, d / f.name)
    (d / "needle.png").write_bytes(png_bytes(1, 2000))  # 90 bytes; was a 256x512000 resize
    code, out, rows = predict(model, d, cache_dir, capsys)
    assert code == 0, out
    assert "needle.png: aspect ratio of 1x2000 is 2000:1, over the limit of 50:1" in out
    assert len(rows) == 3 and not any("needle" in r[0] for r in rows)


class _Boom:
    """Raise MemoryError while decoding (or resizing) the one image of a marker size."""

    SIZE = (77, 55)


def test_memory_error_in_the_decoder_is_a_listed_bad_image(
    model, woof_val, cache_dir, tmp_path, capsys, monkeypatch
):
    d = tmp_path / "in"
    d.mkdir()
    for f in good_images(woof_val):
        shutil.copyfile(f, d / f.name)
    (d / "bomb.png").write_bytes(png_bytes(*_Boom.SIZE, color=(1, 2, 3)))
    (d / "resize.png").write_bytes(png_bytes(*_Boom.SIZE[::-1], color=(4, 5, 6)))
    load, to_uint8 = ImageFile.ImageFile.load, Preprocess.to_uint8

    def failing_load(self):
        if self.size == _Boom.SIZE:
            raise MemoryError()
        return load(self)

    def failing_resize(self, img):
        if img.size == _Boom.SIZE[::-1]:
            raise MemoryError()
        return to_uint8(self, img)

    monkeypatch.setattr(ImageFile.ImageFile, "load", failing_load)
    monkeypatch.setattr(Preprocess, "to_uint8", failing_resize)
    code, out, rows = predict(model, d, cache_dir, capsys)
    assert code == 0, out
    assert "bomb.png: out of memory while decoding it" in out
    assert "resize.png: out of memory while resizing it" in out
    assert len(rows) == 3


# ---------------------------------------------------------------------- 3. huge files
def test_huge_sparse_file_is_skipped_before_reading(model, woof_val, cache_dir, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for f in good_images(woof_val):
        shutil.copyfile(f, d / f.name)
    with open(d / "huge.jpg", "wb") as fh:
        fh.truncate(30 * 1024**3)  # 30 GiB, sparse: takes no disk, but was read whole
    code, out, rows = predict(model, d, cache_dir, capsys)
    assert code == 0, out
    assert "huge.jpg: file is 30720.0 MiB, over the limit of 100.0 MiB (--max-image-mb)" in out
    assert len(rows) == 3


def test_max_image_mb_flag_changes_the_limit(model, woof_val, cache_dir, tmp_path, capsys, monkeypatch):  # fmt: skip
    monkeypatch.delenv("STACKVISION_MAX_IMAGE_MB", raising=False)  # restored after the test
    d = tmp_path / "in"
    d.mkdir()
    small, big = good_images(woof_val)
    shutil.copyfile(small, d / "a.jpg")
    (d / "b.png").write_bytes(os.urandom(64) + b"\0" * 300_000)  # 0.29 MiB
    code, out, rows = predict(model, d, cache_dir, capsys, "--max-image-mb", "0.2")
    assert code == 0, out
    assert "b.png: file is 0.3 MiB, over the limit of 0.2 MiB (--max-image-mb)" in out
    assert len(rows) == 2
    assert "STACKVISION_MAX_IMAGE_MB" not in os.environ  # the flag held for that command only
    code, out, rows = predict(model, d, cache_dir, capsys, "--overwrite")  # later: the default
    assert code == 0, out
    assert "over the limit" not in out and "b.png: not an image file" in out
    assert main(["predict", str(model), str(d), "--max-image-mb", "0"]) == 2
    one_line_error(capsys, "--max-image-mb")


# ---------------------------------------------------------------------- 4. names and encodings
def test_predict_out_keeps_a_non_utf8_file_name(model, woof_val, cache_dir, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    src = good_images(woof_val, 1)[0]
    write_bytes_name(d, b"caf\xe9.jpg", src.read_bytes())
    out = tmp_path / "p.csv"
    p = cli("predict", model, d, "--cache", cache_dir, "--out", out, "-q")
    assert p.returncode == 0, p.stderr
    raw = out.read_bytes()
    assert os.fsencode(str(d)) + b"/caf\xe9.jpg," in raw  # the same bytes as the name on disk
    p = cli("predict", model, d, "--cache", cache_dir, "-q")  # stdout too
    assert p.returncode == 0, p.stderr
    assert b"/caf\xe9.jpg," in p.stdout


def test_train_with_a_non_utf8_bad_image_writes_report_and_metrics(woof_train, cache_dir, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(woof_train, d)
    cls = sorted(os.listdir(d))[0]
    write_bytes_name(d / cls, b"na\xefve-\xff.jpg", b"not an image at all")
    out = tmp_path / "model"
    p = cli("train", d, "--out", out, "--backbones", "lite0", "--folds", "2", "--tta", "none",
            "--cache", cache_dir, "-q")  # fmt: skip
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert b"na\xefve-\xff.jpg: not an image file" in p.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [os.fsencode(x["path"]) for x in metrics["problems"]] == [
        os.fsencode(str(d / cls)) + b"/na\xefve-\xff.jpg"
    ]
    report = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert "na\\xefve-\\xff.jpg" in report


def _labels(tmp_path, woof_train, rows: list[tuple[str, str]]):
    images = tmp_path / "images"
    images.mkdir()
    files = sorted(woof_train.rglob("*.JPEG"))[: len(rows)]
    for f in files:
        shutil.copyfile(f, images / f.name)
    text = "id,breed\n" + "".join(
        f"{ident or f.stem},{label}\n" for f, (ident, label) in zip(files, rows)
    )
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8", newline="")
    return path, images, files


@pytest.mark.parametrize(
    ("label", "shown"), [("pug\0", "\\x00"), ("pu\x1b[31mg", "\\x1b"), ("b\x7feagle", "\\x7f")]
)
def test_control_characters_in_a_label_are_refused_naming_the_line(
    woof_train, cache_dir, tmp_path, capsys, label, shown
):
    csv_path, images, _ = _labels(tmp_path, woof_train, [("", "pug"), ("", label), ("", "pug")])
    args = ["extract", "--labels", str(csv_path), "--images", str(images), "--cache", cache_dir]
    assert main([*args, "-q"]) == 2
    one_line_error(capsys, "labels.csv line 3", "control character", shown)


# ---------------------------------------------------------------------- 5. paths stay inside
@pytest.mark.parametrize("ident", ["../secret", "{abs}", "sub/../../secret"])
def test_csv_ids_outside_the_images_folder_are_refused(
    woof_train, cache_dir, tmp_path, capsys, ident
):
    csv_path, images, files = _labels(tmp_path, woof_train, [("", "a"), ("", "a"), ("", "b")])
    shutil.copyfile(files[0], tmp_path / "secret.jpg")  # exists: the id would resolve
    (images / "sub").mkdir()
    ident = ident.format(abs=str(tmp_path / "secret"))
    csv_path.write_text(csv_path.read_text() + f"{ident},b\n")
    args = ["extract", "--labels", str(csv_path), "--images", str(images), "--backbones", "lite0"]
    args += ["--tta", "none", "--cache", cache_dir, "-q"]
    assert main(args) == 2
    one_line_error(capsys, "labels.csv line 5", f"id '{ident}' leads outside the images folder",
                   "--allow-outside-images")  # fmt: skip
    assert main([*args, "--allow-outside-images"]) == 0
    assert re.search(r"^\s*4\s+4\s+0\s", capsys.readouterr().out, re.M)  # 4 images, 4 used


def test_symlinks_inside_the_images_folder_are_still_followed(woof_train, cache_dir, tmp_path, capsys):  # fmt: skip
    csv_path, images, files = _labels(tmp_path, woof_train, [("", "a"), ("", "b")])
    pool = tmp_path / "pool"
    pool.mkdir()
    shutil.move(images / files[0].name, pool / files[0].name)
    os.symlink(pool / files[0].name, images / files[0].name)  # a shared pool: not an escape
    args = ["extract", "--labels", str(csv_path), "--images", str(images), "--backbones", "lite0"]
    assert main([*args, "--tta", "none", "--cache", cache_dir, "-q"]) == 0


# ---------------------------------------------------------------------- 8. permissions, advice
@pytest.fixture()
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root) -> dict[str, int]:
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
    return out


def test_model_dir_and_onnx_get_the_umask_permissions(model, woof_train, cache_dir, tmp_path, umask022):  # fmt: skip
    out = tmp_path / "model"
    assert train(woof_train, out, cache_dir) == 0
    modes = _modes(out)
    assert {"manifest.json", "metrics.json", "weights.safetensors", "report"} <= set(modes)
    for name, mode in modes.items():
        want = 0o755 if os.path.isdir(out / name) else 0o644
        assert mode == want, (name, oct(mode))
    onnx = tmp_path / "m.onnx"
    assert main(["export", str(model), "--out", str(onnx), "--no-check"]) == 0
    assert stat.S_IMODE(onnx.stat().st_mode) == 0o644


def test_atomic_outputs_follow_another_umask(tmp_path):
    from stackvision.atomic import atomic_dir, atomic_open, write_json

    old = os.umask(0o027)
    try:
        with atomic_dir(str(tmp_path / "d")) as tmp:
            write_json(os.path.join(tmp, "a.json"), {"x": 1})
        with atomic_open(str(tmp_path / "f.csv")) as fh:
            fh.write("x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "d" / "a.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "f.csv").stat().st_mode) == 0o640


@pytest.mark.parametrize(("left", "advised"), [(2, "--folds 2"), (1, "--folds 0")])
def test_folds_advice_is_a_value_that_works(woof_train, cache_dir, tmp_path, capsys, left, advised):
    d = tmp_path / "data"
    shutil.copytree(woof_train, d)
    small = sorted(os.listdir(d))[0]
    for f in sorted(os.listdir(d / small))[left:]:
        os.remove(d / small / f)  # a class of 1 image: no k-fold works, so --folds 2 fails too
    args = ["train", str(d), "--out", str(tmp_path / "m"), "--backbones", "lite0"]
    args += ["--tta", "none", "--cache", cache_dir, "-q"]
    assert main([*args, "--folds", "5"]) == 2
    err = one_line_error(capsys, f"'{small}' has {left}")
    assert re.findall(r"--folds \d+", err.split(". ", 1)[1]) == [advised]
    assert main([*args, *advised.split()]) == 0, capsys.readouterr().err


def test_a_killed_engine_build_leaves_no_temp_files_behind(tmp_path):
    from stackvision.backbones import resolve
    from stackvision.engines.compiled import engines_dir, export_key, export_onnx

    spec = resolve("lite0")
    folder = Path(engines_dir(str(tmp_path)))
    folder.mkdir(parents=True)
    key = export_key(spec, "avg")
    (folder / f"{key}.onnx").write_bytes(b"built")  # cached: export_onnx only tidies
    stale = [f"{key}.onnx.ab3_x9qz.onnx.tmp", f"{key}.onnx.k2j4h5g6.pre.onnx",
             f"{key}.int8.xml.zz00yy11.xml", f"{key}.int8.xml.zz00yy11.bin"]  # fmt: skip
    fresh = f"{key}.onnx.q1w2e3r4.onnx.tmp"  # another process building right now
    for name in [*stale, fresh, f"{key}.json"]:
        (folder / name).write_bytes(b"x")
    old = time.time() - 2 * 3600
    for name in [*stale, f"{key}.json"]:
        os.utime(folder / name, (old, old))
    assert export_onnx(spec, cache_dir=str(tmp_path)).endswith(".onnx")
    assert sorted(os.listdir(folder)) == sorted([f"{key}.onnx", fresh, f"{key}.json"])
