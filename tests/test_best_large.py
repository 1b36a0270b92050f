"""``--preset best``'s second stack, the default's readout at larger inputs: its cost probe,
the member it adds on the hold-out H, and the model that comes out, through the CLI on real
flower images. The real pair (fine-grained -> fine-grained-large) is data in
``best_pipeline.LARGER_INPUTS``; the tests map lite0 -> lite0@288 to stay fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stackvision import Runtime, StackedClassifier, best_pipeline, load_model
from stackvision.backbones import DEFAULT_STACK, FINE_GRAINED_LARGE
from stackvision.best_pipeline import _large_stack_need
from stackvision.cli import main
from stackvision.errors import StackvisionError
from stackvision.readout import expand_named, stack_label


def _paths(folder) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*.jpg"))


def _train(data, out, cache_dir, *extra):
    args = ["train", str(data), "--out", str(out), "--folds", "2", "--cache", cache_dir]
    return main([*args, "--device", "cpu", "--preset", "best", "--backbones", "lite0", *extra])


@pytest.fixture()
def lite0_larger(monkeypatch):
    monkeypatch.setattr(best_pipeline, "LARGER_INPUTS", {("lite0",): ("lite0@288",)})
    monkeypatch.setattr(best_pipeline, "FT_MEMBERS", ())  # the stacks only


def test_the_default_stack_has_a_larger_input_twin():
    assert best_pipeline.LARGER_INPUTS[DEFAULT_STACK] == FINE_GRAINED_LARGE
    large = ["lite0@320+gem+mid2", "lite1@336+gem+mid2", "lite2@352+gem+mid2"]  # as measured
    assert expand_named(["fine-grained-large"]) == large == list(FINE_GRAINED_LARGE)
    # the steps table names them so
    assert stack_label(FINE_GRAINED_LARGE) == "fine-grained-large"
    assert stack_label(DEFAULT_STACK) == "fine-grained"
    assert stack_label(["lite0", "lite1@288"]) == "lite0+lite1@288"
    sizes = lambda names: [int(n.split("@")[1].split("+")[0]) for n in names]  # noqa: E731
    assert all(b > a for a, b in zip(sizes(DEFAULT_STACK), sizes(FINE_GRAINED_LARGE)))


def test_the_cost_probe_extracts_a_sample_and_reads_the_cache(flowers_small, tmp_path, monkeypatch):
    monkeypatch.setattr(best_pipeline, "PROBE_WARM", 2)
    monkeypatch.setattr(best_pipeline, "PROBE_TIMED", 4)
    paths = _paths(flowers_small)
    rt = Runtime(cache_dir=str(tmp_path / "cache"), device="cpu", progress=False)
    large = StackedClassifier(["lite0@288"], tta="none", runtime=rt)
    need, probe_s = _large_stack_need(large, paths, fit_seconds=2.0)
    assert probe_s > 0 and need > 2.4  # 24 images still to extract, plus 1.2x the first fit
    again, _ = _large_stack_need(large, paths, fit_seconds=2.0)
    assert again == pytest.approx(2.4)  # the sample is cached now: only the fit is left
    stats = large.features(paths).stats  # the probe's 6 images were not extracted for nothing
    assert (stats["n_cached"], stats["n_computed"]) == (6, 24)


def test_unfitted_int8_features_are_refused(flowers_small):
    model = StackedClassifier(["lite0"], runtime=Runtime(precision="int8", device="cpu"))
    with pytest.raises(StackvisionError, match="calibration"):
        model.features(_paths(flowers_small))


def test_best_adds_the_larger_input_stack_on_h(
    flowers_small, heldout, cache_dir, tmp_path, lite0_larger
):
    out = tmp_path / "best"
    assert _train(flowers_small, out, cache_dir, "--time-limit", "10m", "--seed", "1", "-q") == 0
    steps = json.loads((out / "steps.json").read_text())["steps"]
    by_name = {s["step"]: s for s in steps}
    large, h = by_name["+ stack lite0@288"], by_name["stack, on H"]
    assert large["scored on"] == h["scored on"] == "H" and large["n_images"] == h["n_images"]
    assert "out-of-fold" in large["note"] and "gain_log_loss" in large
    # the two stacks combined on their out-of-fold rows outside H (24 of 30), scored on H
    pair = next(s for s in steps if s["step"].startswith("+ both stacks, best"))
    assert pair["scored on"] == "H" and pair["n_images"] == h["n_images"]
    assert "24 images outside H" in pair["note"]
    assert not any(s["step"].startswith("+ ensemble best") for s in steps)  # no fine-tuned member
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["kind"] == "ensemble":
        assert [m["name"] for m in manifest["members"]] == ["stack", "stack-large"]
        assert [m["kind"] for m in manifest["members"]] == ["stack", "stack"]
    else:  # the selection kept one stack alone: which one, the protocol says
        assert manifest["kind"] == "stack"
        protocol = json.loads((out / "metrics.json").read_text())["protocol"]
        assert "The model is stack alone" in protocol or "is stack-large alone" in protocol
    model = load_model(str(out), cache_dir=cache_dir, device="cpu")
    proba = model.predict_proba(_paths(heldout))
    assert proba.shape == (12, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    ev = tmp_path / "ev"
    assert main(["evaluate", str(out), str(heldout), "--out", str(ev), "--cache", cache_dir]) == 0
    assert json.loads((ev / "metrics.json").read_text())["n_images"] == 12


def test_best_skips_the_larger_stack_without_time(flowers_small, cache_dir, tmp_path, lite0_larger):
    out = tmp_path / "best-1s"
    assert _train(flowers_small, out, cache_dir, "--time-limit", "1s", "-q") == 0
    steps = json.loads((out / "steps.json").read_text())["steps"]
    large = next(s for s in steps if s["step"] == "+ stack lite0@288")
    assert large["note"].startswith("skipped") and "accuracy" not in large
    assert json.loads((out / "manifest.json").read_text())["kind"] == "stack"


def test_best_says_why_an_int8_stack_gets_no_larger_twin(
    flowers_small, cache_dir, tmp_path, lite0_larger
):
    out = tmp_path / "best-int8"
    assert _train(flowers_small, out, cache_dir, "--time-limit", "10m", "--precision", "int8") == 0
    steps = json.loads((out / "steps.json").read_text())["steps"]
    large = next(s for s in steps if s["step"] == "+ stack lite0@288")
    assert "skipped: int8" in large["note"]
    assert json.loads((out / "manifest.json").read_text())["precision"] == "int8"


def test_best_saves_both_stacks_when_their_combination_wins(
    flowers_small, heldout, cache_dir, tmp_path, lite0_larger, monkeypatch
):
    from stackvision import ensemble_combiners
    from stackvision.ensemble_combiners import Selection

    # which combiner wins on 30 images is chance: make the selection take the mean
    monkeypatch.setattr(ensemble_combiners, "fit_best",
                        lambda P, y, n, seed=0, names=None, folds=3: Selection("mean", "mean", None))  # fmt: skip
    out = tmp_path / "best-pair"
    assert _train(flowers_small, out, cache_dir, "--time-limit", "10m", "-q") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "ensemble"
    assert [(m["name"], m["kind"]) for m in manifest["members"]] == [
        ("stack", "stack"), ("stack-large", "stack")
    ]  # fmt: skip
    assert "both stacks (mean)" in json.loads((out / "metrics.json").read_text())["protocol"]
    from stackvision.model_dir import file_hashes, read_training_hashes

    # fitted on the training images only: every one of them, and nothing else
    assert read_training_hashes(str(out)) == set(file_hashes(_paths(flowers_small)))
    model = load_model(str(out), cache_dir=cache_dir, device="cpu")
    paths = _paths(heldout)
    each = [m.predict_proba(paths) for m in model.members_]
    np.testing.assert_allclose(model.predict_proba(paths), np.mean(each, axis=0), atol=1e-6)
    onnx = tmp_path / "pair.onnx"
    assert main(["export", str(out), "--format", "onnx", "--out", str(onnx)]) == 0
    assert onnx.stat().st_size > 1_000_000
