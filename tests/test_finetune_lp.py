"""Fine-tuning recipes on real flower images (64 px, a few epochs, CPU): LP-FT starts exactly at
the linear probe, layer-wise lr decay, EMA of the weights, mixup, and the time limit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stackvision import Runtime, load_model
from stackvision.cli import main
from stackvision.data import from_folder
from stackvision.finetune import FineTunedClassifier, backbone_blocks
from stackvision.finetune_recipes import Deadline, WeightEMA, decayed_groups, mixup
from stackvision.heads import LogRegHead

CPU = Runtime(device="cpu", progress=False)
SMALL = {"input_size": 64, "batch_size": 8, "val_split": 0.3, "runtime": CPU}


def _data(folder, classes=None):
    d = from_folder(str(folder))
    keep = [i for i, c in enumerate(d.labels) if classes is None or c in classes]
    return [d.paths[i] for i in keep], [d.labels[i] for i in keep]


def _probe_proba(model, paths, C):
    """The logistic regression a user would fit on the frozen backbone's features."""
    imgs, _, _ = model._load(model.train_paths_)
    X = model._backbone_features(imgs).numpy()
    head = LogRegHead(C=C, max_iter=200).fit(X, model.train_y_, len(model.classes_))
    vimgs, _, _ = model._load(paths)
    return head.predict_proba(model._backbone_features(vimgs).numpy())


@pytest.mark.parametrize("classes", [None, ["daisy", "tulip"]], ids=["3-classes", "2-classes"])
def test_lp_head_predicts_what_the_probe_predicts_before_any_step(flowers_small, classes):
    X, y = _data(flowers_small, classes)
    model = FineTunedClassifier(
        "lite0", head_init="lp", lp_C=0.1, epochs=0, tta="none", calibrate=False, **SMALL
    ).fit(X, y)
    assert model.history_ == [] and model.lp_["C"] == 0.1
    pred = model.predict_paths(X)
    np.testing.assert_allclose(pred.proba, _probe_proba(model, pred.paths, 0.1), atol=2e-4)
    # the probe is not a constant: it separates the training images
    assert (pred.proba.argmax(1) == [model.classes_.index(c) for c in y]).mean() > 0.8


def test_lp_ft_keeps_the_probe_unless_fine_tuning_beats_it(flowers_small):
    X, y = _data(flowers_small)
    model = FineTunedClassifier(
        "lite0", head_init="lp", epochs=2, unfreeze=1, finetune_lr=1e-4, **SMALL
    ).fit(X, y)
    hist = model.history_
    assert [h["phase"] for h in hist] == ["finetune", "finetune"]  # no head phase
    # compared after each one's best temperature, as the calibrated model will be
    assert all("val_loss_cal" in h for h in hist) and "val_loss_cal" in model.lp_
    best = min(h["val_loss_cal"] for h in hist)
    if best < model.lp_["val_loss_cal"] - 1e-6:
        assert model.best_epoch_ == 1 + int(np.argmin([h["val_loss_cal"] for h in hist]))
    else:
        assert model.best_epoch_ == 0  # the probe's weights were kept


def test_layerwise_lr_decay_groups():
    from stackvision.backbones import build_model, resolve
    from stackvision.finetune_net import build_net

    net = build_net(build_model(resolve("lite0")), 3, 0.0)
    params = [p for p in net.backbone.parameters()]
    groups = decayed_groups(net, params, 1e-3, 0.5)
    assert groups[0]["lr"] == 1e-3 and groups[0]["params"] == list(net.fc.parameters())
    lrs = [g["lr"] for g in groups]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # lower layers learn slower
    placed = [id(p) for g in groups[1:] for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in params)  # each parameter exactly once
    blocks, tail = backbone_blocks(net.backbone)
    with_params = [m for m in [*tail, *blocks] if any(True for _ in m.parameters())]
    in_modules = {id(p) for m in with_params for p in m.parameters()}
    stem = [p for p in params if id(p) not in in_modules]  # conv_stem, bn1: the lowest rate
    assert stem and len(groups) == 1 + len(with_params) + 1
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 ** (len(groups) - 1))


def test_lr_decay_reaches_the_optimizer(flowers_small):
    X, y = _data(flowers_small)
    model = FineTunedClassifier("lite0", head_epochs=0, epochs=1, unfreeze=2, lr_decay=0.5, **SMALL)
    model.fit(X, y)
    rec = json.loads(json.dumps(model._training_record()))
    assert rec["lr_decay"] == 0.5 and rec["head_init"] == "random"
    opt = model._optimizer("finetune", model._set_trainable("finetune"))
    lrs = [g["lr"] for g in opt.param_groups]
    assert len(lrs) > 3 and lrs[0] == pytest.approx(1e-4) and lrs[-1] < lrs[1] < lrs[0]


def test_weight_ema_average_and_swap():
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = WeightEMA(lin, 0.5)
    values = [1.0, 2.0, 3.0]
    expected = 0.0
    for n, v in enumerate(values):
        with torch.no_grad():
            lin.weight.fill_(v)
        ema.update()
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * v
    ema.swap_in()
    assert float(lin.weight.detach()[0, 0]) == pytest.approx(expected)
    ema.swap_out()
    assert float(lin.weight.detach()[0, 0]) == 3.0


def test_mixup_blends_inputs_and_labels():
    x = torch.arange(8.0).view(4, 2)
    y = torch.tensor([0, 1, 2, 3])
    mx, ya, yb, lam = mixup(x, y, 0.4, np.random.default_rng(0))
    perm = yb.numpy()
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and 0 <= lam <= 1
    np.testing.assert_allclose(mx.numpy(), lam * x.numpy() + (1 - lam) * x.numpy()[perm])
    assert ya is y


def test_ema_and_mixup_train_and_reload(flowers_small, tmp_path):
    X, y = _data(flowers_small)
    model = FineTunedClassifier(
        "lite0", head_init="lp", epochs=2, unfreeze=1, ema=0.9, mixup=0.2, **SMALL
    ).fit(X, y)
    assert len(model.history_) == 2 and all(np.isfinite(h["loss"]) for h in model.history_)
    path = model.save(str(tmp_path / "m"), report=False)
    again = load_model(path, CPU)
    assert (again.ema, again.mixup, again.head_init) == (0.9, 0.2, "lp")
    np.testing.assert_allclose(again.predict_proba(X[:4]), model.predict_proba(X[:4]), atol=1e-5)


def test_deadline_object():
    d = Deadline(None)
    assert d.next_epoch_fits(1e9) and not d.passed()
    d = Deadline(1000.0)
    assert d.next_epoch_fits(10.0) and not d.next_epoch_fits(5000.0) and d.hit


def test_time_limit_stops_cleanly_with_best_weights(flowers_small):
    X, y = _data(flowers_small)
    model = FineTunedClassifier(
        "lite0", head_init="lp", epochs=500, unfreeze=1, time_limit=8.0, patience=500, **SMALL
    ).fit(X, y)
    assert model.deadline_.hit and 0 < len(model.history_) < 500
    assert model._training_record()["stopped_by_time_limit"] is True
    assert 0 <= model.best_epoch_ <= len(model.history_)
    assert model.predict_proba(X[:2]).shape == (2, 3)


def test_finetune_cli_lp_ft_recipe(flowers_small, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", str(flowers_small), "--out", str(out), "--head-init", "lp", "--lp-C", "0.2"]
    args += ["--epochs", "1", "--unfreeze", "all", "--lr-decay", "0.7", "--ema", "0.9"]
    args += ["--mixup", "0.2", "--time-limit", "10m", "--input-size", "64", "--batch-size", "8"]
    assert main([*args, "--val-split", "0.3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "linear probe (start of LP-FT)" in printed
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert training["head_init"] == "lp" and training["lp_C"] == 0.2
    assert training["lr_decay"] == 0.7 and training["ema"] == 0.9 and training["mixup"] == 0.2
    assert training["linear_probe"]["val_accuracy"] > 0 and training["time_limit"] == 600


@pytest.mark.parametrize(
    "flag,value,named",
    [("--lr-decay", "1.5", "--lr-decay"), ("--ema", "1", "--ema"), ("--time-limit", "soon", "")],
)
def test_bad_recipe_values_are_user_errors(flowers_small, tmp_path, capsys, flag, value, named):
    argv = ["finetune", str(flowers_small), "--out", str(tmp_path / "ft"), flag, value, "-q"]
    if flag == "--time-limit":  # refused by the parser: usage line, exit 2
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        named = "not a duration: 'soon' (e.g. 600, 90s, 20m, 1h, 1h30m)"
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and named in err and "Traceback" not in err
