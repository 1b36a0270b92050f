"""Fine-tuning on a tiny slice (64 px, few epochs, CPU): loss goes down, BN statistics stay frozen,
an interrupted run resumes to the same result, the saved model predicts the same after reload in
another process, and the export module matches predict_proba."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from stackvision import Runtime, load_model
from stackvision.cli import main
from stackvision.data import from_folder
from stackvision.errors import StackvisionError
from stackvision.finetune import FineTunedClassifier, backbone_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = Runtime(device="cpu")

# The same settings for the CLI run and the API runs, so their histories must agree.
SETTINGS = {
    "head_epochs": 2,
    "epochs": 2,
    "unfreeze": 1,
    "input_size": 64,
    "batch_size": 8,
    "val_split": 0.3,
    "lr": 3e-3,
    "augment": "light",
}
CLI_ARGS = [
    "--head-epochs", "2", "--epochs", "2", "--unfreeze", "1", "--input-size", "64",
    "--batch-size", "8", "--val-split", "0.3", "--lr", "0.003", "--augment", "light",
    "--device", "cpu", "-q",
]  # fmt: skip


@pytest.fixture(scope="module")
def ft_dir(flowers_small, tmp_path_factory):
    """A model fine-tuned through the CLI on 3 flower classes x 10 images."""
    out = tmp_path_factory.mktemp("ft") / "model"
    assert main(["finetune", str(flowers_small), "--out", str(out), *CLI_ARGS]) == 0
    return out


def test_finetune_cli_writes_model(ft_dir):
    manifest = json.loads((ft_dir / "manifest.json").read_text())
    assert manifest["kind"] == "finetune" and manifest["format_version"] == 2
    assert manifest["head"]["output"] == "softmax"
    assert manifest["input"]["size"] == 64
    assert (ft_dir / "weights.safetensors").is_file()
    assert (ft_dir / "report" / "report.html").is_file()
    assert (ft_dir / "report" / "learning_curves.png").is_file()
    assert not os.path.exists(str(ft_dir) + ".work")  # checkpoint removed after success
    (hist,) = json.loads((ft_dir / "history.json").read_text())
    assert [h["phase"] for h in hist] == ["head", "head", "finetune", "finetune"]
    metrics = json.loads((ft_dir / "metrics.json").read_text())
    assert metrics["n_images"] == 9 and 0 <= metrics["accuracy"] <= 1


def test_training_loss_goes_down(ft_dir):
    (hist,) = json.loads((ft_dir / "history.json").read_text())
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[2]["lr"] == pytest.approx(3e-4)  # fine-tuning phase runs at lr / 10


def test_batchnorm_statistics_stay_frozen(ft_dir):
    from stackvision.backbones import build_model, resolve

    pretrained = build_model(resolve("lite0")).state_dict()
    model = load_model(str(ft_dir))
    tuned = {k: v.cpu() for k, v in model.net_.backbone.state_dict().items()}
    blocks, tail = backbone_blocks(model.net_.backbone)
    assert len(blocks) == 16 and tail  # EfficientNet-Lite0: 16 blocks, then conv_head/bn2
    bn_keys = [k for k in tuned if k.endswith(("running_mean", "running_var"))]
    assert bn_keys
    for k in bn_keys:
        torch.testing.assert_close(tuned[k], pretrained[k])
    torch.testing.assert_close(tuned["conv_stem.weight"], pretrained["conv_stem.weight"])
    # Phase 2 with --unfreeze 1: the last block and conv_head learn, BN layers stay in eval mode
    # with frozen scale/shift, everything below is frozen.
    model.unfreeze = 1
    trainable = {id(p) for p in model._set_trainable("finetune")}
    assert trainable
    net = model.net_.backbone
    assert all(id(p) in trainable for p in net.conv_head.parameters())
    assert all(id(p) in trainable for p in blocks[-1].conv_pwl.parameters())
    assert not any(p.requires_grad for p in blocks[-2].parameters())
    assert not any(p.requires_grad for p in net.conv_stem.parameters())
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training or m.weight.requires_grad for m in bns)
    assert blocks[-1].training and not blocks[-2].training


def test_resume_after_interruption(ft_dir, flowers_small, tmp_path):
    listing = from_folder(str(flowers_small))
    work = str(tmp_path / "run.work")

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after epoch 1

    first = FineTunedClassifier("lite0", work_dir=work, runtime=CPU, **SETTINGS)
    with pytest.raises(KeyboardInterrupt):
        first.fit(listing.paths, listing.labels, on_epoch_end=stop_after_first)
    assert os.path.isfile(os.path.join(work, "checkpoint.safetensors"))

    again = FineTunedClassifier("lite0", work_dir=work, runtime=CPU, **SETTINGS)
    again.fit(listing.paths, listing.labels)
    assert again.resumed_from_epoch_ == 1
    (reference,) = json.loads((ft_dir / "history.json").read_text())
    assert len(again.history_) == len(reference) == 4
    for a, b in zip(again.history_, reference):
        assert a["phase"] == b["phase"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3, abs=1e-4)

    # Other settings with the same work dir: refused, not silently mixed.
    other = FineTunedClassifier("lite0", work_dir=work, runtime=CPU, **{**SETTINGS, "lr": 0.01})
    with pytest.raises(StackvisionError, match="different training run"):
        other.fit(listing.paths, listing.labels)


def test_reload_in_another_process_predicts_identically(ft_dir, flowers_small):
    paths = sorted(str(p) for p in flowers_small.rglob("*.jpg"))[:6]
    here = load_model(str(ft_dir)).predict_proba(paths)
    code = (
        "import json, sys; from stackvision import Runtime, load_model; "
        "m = load_model(sys.argv[1]); "
        "print(json.dumps(m.predict_proba(sys.argv[2:]).tolist()))"
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(ft_dir), *paths],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    there = np.asarray(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(there, here, atol=1e-6)
    np.testing.assert_allclose(here.sum(axis=1), 1.0, atol=1e-6)


def test_torch_module_matches_predict(ft_dir, flowers_small):
    from stackvision.images import load_rgb

    model = load_model(str(ft_dir))
    paths = sorted(str(p) for p in flowers_small.rglob("*.jpg"))[:4]
    pp = model.input_preprocess()
    batch = np.stack([pp.to_uint8(load_rgb(p, pp.resize_size)) for p in paths])
    assert batch.shape == (4, 64, 64, 3)
    with torch.no_grad():
        out = model.to_torch_module()(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(out, model.predict_proba(paths), atol=1e-5)


def test_two_classes_sigmoid_and_bad_images_reported(flowers_small, tmp_path):
    data = tmp_path / "two"
    for c in ("daisy", "tulip"):
        shutil.copytree(flowers_small / c, data / c)
    (data / "tulip" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    listing = from_folder(str(data))
    model = FineTunedClassifier(
        "lite0", head_epochs=2, epochs=0, input_size=64, batch_size=8, val_split=0.3, runtime=CPU
    )
    model.fit(listing.paths, listing.labels)
    assert model.net_.fc.out_features == 1  # one sigmoid output for two classes
    assert [p.path for p in model.problems_] == [str(data / "tulip" / "broken.jpg")]
    pred = model.predict_paths(listing.paths)
    assert len(pred.paths) == 20 and len(pred.problems) == 1
    np.testing.assert_allclose(pred.proba.sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(StackvisionError, match="broken.jpg"):
        model.predict_proba(listing.paths)


def test_bad_options_are_user_errors(flowers_small, tmp_path, capsys):
    out = str(tmp_path / "m")
    assert main(["finetune", str(flowers_small), "--out", out, "--unfreeze", "-1", "-q"]) == 2
    assert main(["finetune", str(flowers_small), "--out", out, "--backbone", "nope", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err


def test_phases_stop_cut_lr_and_resume_inside_phase_two(flowers_small, tmp_path, one_torch_thread):
    """Regression for the switch to the shared TrainingLoop (histories, weights and predictions
    were bit-identical before/after): each phase stops early and cuts its LR on its own, the best
    weights span both; a run killed inside phase 2 resumes to the same weights."""
    listing = from_folder(str(flowers_small))
    kw = {**SETTINGS, "head_epochs": 6, "epochs": 5, "lr": 0.02, "patience": 1, "lr_patience": 0,
          "augment": None}  # fmt: skip

    def fit(work_dir=None, hook=None):
        m = FineTunedClassifier("lite0", work_dir=work_dir, runtime=CPU, **kw)
        return m.fit(listing.paths, listing.labels, on_epoch_end=hook)

    full = fit()
    assert [r["phase"] for r in full.history_] == ["head"] * 4 + ["finetune"] * 4
    lrs = [0.02, 0.02, 0.02, 0.006, 0.002, 0.002, 0.002, 0.0006]
    assert [r["lr"] for r in full.history_] == pytest.approx(lrs)
    assert full.best_epoch_ == 6 and full.stopped_early_

    def kill(record):
        if record["epoch"] == 6:
            raise KeyboardInterrupt

    work = str(tmp_path / "work")
    with pytest.raises(KeyboardInterrupt):
        fit(work, kill)
    again = fit(work)
    assert again.resumed_from_epoch_ == 6

    def strip(h):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in h]

    assert strip(again.history_) == strip(full.history_)
    for (k, a), b in zip(full.net_.state_dict().items(), again.net_.state_dict().values()):
        assert torch.equal(a, b), k
    # on_epoch_end returning True ends training: the fine-tuning phase does not start
    assert [r["epoch"] for r in fit(hook=lambda r: True).history_] == [1]
