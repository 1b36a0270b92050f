"""The command line: every verb on real images, output files, and one-line user errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest

from stackvision.cli import build_parser, main

from .conftest import ROOT, synthetic_image

# every verb the parser knows (a new verb is covered without editing this list)
VERBS = sorted(build_parser()._subparsers._group_actions[0].choices)


def run_cli(*args):
    """Run the real console entry point in a subprocess; returns (code, stdout, stderr)."""
    p = subprocess.run(
        [sys.executable, "-m", "stackvision.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def trained(woof_train, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model"
    assert (
        main(
            [
                "train",
                str(woof_train),
                "--out",
                str(out),
                "--backbones",
                "lite0",
                "--folds",
                "3",
                "--cache",
                cache_dir,
                "--compare",
                "-q",
            ]
        )
        == 0
    )
    return out


def test_train_writes_model_metrics_and_report(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"accuracy", "top5_accuracy", "log_loss", "n_images", "per_class"} <= set(metrics)
    assert metrics["n_images"] == 48 and metrics["accuracy"] > 0.7
    assert (trained / "weights.safetensors").stat().st_size > 0
    report = (trained / "report" / "report.html").read_text()
    for png in ("confusion_matrix.png", "per_class_accuracy.png"):
        assert (trained / "report" / png).stat().st_size > 5000
        assert png in report
    assert "Most confident mistakes" in report
    rows = json.loads((trained / "compare.json").read_text())
    assert [(r["model"], r["views"]) for r in rows] == [("lite0", "orig"), ("lite0", "orig+flip")]
    assert all(0.5 < r["cv_accuracy"] <= 1 and 0 <= r["cv_log_loss"] < 0.7 for r in rows)


def test_predict_topk_and_kaggle_formats(trained, woof_val, cache_dir, tmp_path):
    topk = tmp_path / "topk.csv"
    assert (
        main(
            [
                "predict",
                str(trained),
                str(woof_val),
                "--cache",
                cache_dir,
                "--top-k",
                "3",
                "--out",
                str(topk),
                "-q",
            ]
        )
        == 0
    )
    rows = list(csv.reader(topk.open()))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert len(rows) == 25
    correct = sum(r[1] == r[0].split("/")[-2] for r in rows[1:])
    assert correct >= 16
    kaggle = tmp_path / "sub.csv"
    assert (
        main(
            [
                "predict",
                str(trained),
                str(woof_val),
                "--cache",
                cache_dir,
                "--format",
                "kaggle",
                "--out",
                str(kaggle),
                "-q",
            ]
        )
        == 0
    )
    rows = list(csv.reader(kaggle.open()))
    manifest = json.loads((trained / "manifest.json").read_text())
    assert rows[0] == ["id", *manifest["classes"]]
    assert rows[1][0] == sorted(woof_val.rglob("*.JPEG"))[0].stem
    for r in rows[1:]:
        assert sum(float(v) for v in r[1:]) == pytest.approx(1, abs=1e-4)


def test_evaluate_writes_metrics_and_report(trained, woof_val, cache_dir, tmp_path, capsys):
    assert (
        main(
            [
                "evaluate",
                str(trained),
                str(woof_val),
                "--out",
                str(tmp_path / "ev"),
                "--cache",
                cache_dir,
                "-q",
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_images"] == 24 and {"accuracy", "top5_accuracy", "log_loss", "per_class"} <= set(m)
    assert (tmp_path / "ev" / "report" / "report.html").exists()
    assert "accuracy" in capsys.readouterr().out


def test_bad_image_is_counted_in_summary_and_metrics(woof_train, cache_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(woof_train, data)
    (data / "n02086240" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    out = tmp_path / "m"
    assert (
        main(
            [
                "train",
                str(data),
                "--out",
                str(out),
                "--backbones",
                "lite0",
                "--folds",
                "2",
                "--tta",
                "none",
                "--cache",
                cache_dir,
                "-q",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert "1 file(s) left out" in said and "broken.jpg" in said
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p["path"].endswith("broken.jpg") for p in metrics["problems"]] == [True]
    assert "broken.jpg" in (out / "report" / "report.html").read_text()
    code, _, err = run_cli(
        "train",
        data,
        "--out",
        tmp_path / "m2",
        "--backbones",
        "lite0",
        "--folds",
        "2",
        "--cache",
        cache_dir,
        "--strict",
        "-q",
    )
    assert code == 2 and "broken.jpg" in err and "Traceback" not in err


def test_train_from_kaggle_labels_csv(woof_train, cache_dir, tmp_path):
    imgs = tmp_path / "train"
    imgs.mkdir()
    lines = ["id,breed"]
    for i, p in enumerate(sorted(woof_train.rglob("*.JPEG"))):
        shutil.copyfile(p, imgs / f"img{i:03d}.jpg")
        lines.append(f"img{i:03d},{p.parent.name}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "m"
    assert (
        main(
            [
                "train",
                "--labels",
                str(tmp_path / "labels.csv"),
                "--images",
                str(imgs),
                "--out",
                str(out),
                "--backbones",
                "lite0",
                "--folds",
                "3",
                "--cache",
                cache_dir,
                "-q",
            ]
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 48


def test_extract_fills_the_cache_then_reuses_it(woof_val, tmp_path):
    code, out, err = run_cli(
        "extract",
        woof_val,
        "--backbones",
        "lite0",
        "--tta",
        "none",
        "--cache",
        tmp_path / "c",
        "-q",
    )
    assert code == 0, err
    code, out, _ = run_cli(
        "extract",
        woof_val,
        "--backbones",
        "lite0",
        "--tta",
        "none",
        "--cache",
        tmp_path / "c",
        "-q",
    )
    header, _, values = out.splitlines()[:3]
    row = dict(zip(header.split(), values.split()))
    assert row["cached"] == "24" and row["computed"] == "0"


def _one_class(tmp_path):
    (tmp_path / "one" / "a").mkdir(parents=True)
    for i in range(3):
        synthetic_image(seed=i).save(tmp_path / "one" / "a" / f"{i}.png")
    return tmp_path / "one"


def _small_class(tmp_path, woof_train):
    d = tmp_path / "small"
    shutil.copytree(woof_train, d)
    for p in sorted((d / "n02087394").iterdir())[2:]:
        p.unlink()
    return d


def _missing_row_csv(tmp_path):
    (tmp_path / "imgs").mkdir()
    synthetic_image().save(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "l.csv").write_text("id,breed\na,x\nb,y\n")
    return tmp_path / "l.csv"


def _future_model(tmp_path, trained):
    d = tmp_path / "future"
    shutil.copytree(trained, d)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "data folder not found"),
        ("one_class", "only one class"),
        ("small_class", "fewer images than --folds 5"),
        ("csv_missing", "have no image file"),
        ("unknown_backbone", "unknown backbone 'resnet9000'"),
        ("future_model", "format version 99"),
    ],
)
def test_user_errors_are_one_line_exit_2(case, expect, tmp_path, woof_train, trained, cache_dir):
    out = tmp_path / "out"
    args = {
        "missing": ["train", tmp_path / "nope", "--out", out],
        "one_class": [
            "train",
            _one_class(tmp_path),
            "--out",
            out,
            "--backbones",
            "lite0",
            "--folds",
            "0",
        ],
        "small_class": ["train", _small_class(tmp_path, woof_train), "--out", out],
        "csv_missing": [
            "train",
            "--labels",
            _missing_row_csv(tmp_path),
            "--images",
            tmp_path / "imgs",
            "--out",
            out,
        ],
        "unknown_backbone": ["train", woof_train, "--out", out, "--backbones", "lite0,resnet9000"],
        "future_model": ["predict", _future_model(tmp_path, trained), woof_train],
    }[case]
    code, stdout, stderr = run_cli(*args, "--cache", cache_dir)
    assert code == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_documents_its_options(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([verb, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: stackvision " + verb in text
    for action in build_parser()._subparsers._group_actions[0].choices[verb]._actions:
        assert action.help, f"{verb} option {action.dest} has no help"


def test_backbones_verb_lists_registry():
    code, out, _ = run_cli("backbones")
    assert code == 0 and "lite0" in out and "offline-ready" in out and "inception_v3" in out
