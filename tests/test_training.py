"""The shared training loop: callbacks on scripted losses, resume, and the heads that use it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stackvision.training import (
    BestWeights,
    EarlyStopping,
    Hook,
    ReduceLROnPlateau,
    TrainingLoop,
)

from .test_shards import _generated


class Scripted:
    """A 'model' whose weights are the number of epochs trained and whose validation losses are
    a fixed script, so every callback decision is known in advance."""

    def __init__(self, losses):
        self.losses, self.weights, self.param_groups = list(losses), 0, [{"lr": 0.1}, {"lr": 0.1}]

    def train_epoch(self, epoch):
        self.weights = epoch + 1
        return {"loss": 10.0 - epoch, "accuracy": 0.5}

    def validate(self, epoch):
        return {"val_loss": self.losses[epoch], "val_accuracy": 0.5}

    def restore(self, w):
        self.weights = w

    def loop(self, callbacks, **kw):
        return TrainingLoop(
            self.train_epoch, self.validate, callbacks, lr=lambda: self.param_groups[0]["lr"], **kw
        )


def test_early_stopping_waits_patience_bad_epochs_then_stops():
    m = Scripted([1.0, 0.9, 0.95, 0.92, 0.91, 0.5, 0.4])
    stop = EarlyStopping(patience=2, min_delta=0.0)
    hist = m.loop([stop]).run(7)
    # best 0.9 at epoch 2; epochs 3, 4, 5 do not beat it; the third bad one (> patience) stops
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4, 5]
    assert stop.stopped_epoch == 5 and stop.best == 0.9
    # min_delta: improvements of 0.0005 are none when min_delta is 1e-3 (two bad epochs: stop)
    m = Scripted([1.0, 0.9995, 0.999, 0.5])
    assert len(m.loop([EarlyStopping(patience=1, min_delta=1e-3)]).run(4)) == 3
    # patience 0: the first epoch without improvement stops
    m = Scripted([1.0, 1.0, 0.5])
    assert len(m.loop([EarlyStopping(patience=0)]).run(3)) == 2


def test_plateau_reduction_matches_torch_scheduler():
    torch = pytest.importorskip("torch")
    losses = [1.0, 0.9, 0.9, 0.89995, 0.91, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    for kw in ({}, {"min_lr": 0.004}, {"cooldown": 2}):
        m = Scripted(losses)
        cb = ReduceLROnPlateau(m, factor=0.3, patience=1, **kw)
        hist = m.loop([cb]).run(len(losses))
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([{"params": [p]}, {"params": [torch.nn.Parameter(p.detach())]}], 0.1)
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=1, **kw)
        want = []
        for v in losses:
            want.append(opt.param_groups[0]["lr"])
            ref.step(v)
        assert [r["lr"] for r in hist] == want, kw
        assert [g["lr"] for g in m.param_groups] == [g["lr"] for g in opt.param_groups]
        if not kw:  # 0.89995 is no 1e-4 relative improvement on 0.9: 2 bad epochs, lr cut
            assert [round(r["lr"], 6) for r in hist[:6]] == [0.1, 0.1, 0.1, 0.1, 0.03, 0.03]


def test_best_weights_are_restored_at_the_end():
    m = Scripted([1.0, 0.6, 0.7, 0.59995, 0.8])
    best = BestWeights(lambda: m.weights, m.restore, min_delta=1e-4)
    m.loop([best]).run(5)
    assert m.weights == 2 and best.best_epoch == 2 and best.best == 0.6  # 0.59995: < min_delta
    # without an improvement nothing is kept, and the preset weights are what comes back
    m = Scripted([float("nan")] * 3)
    best = BestWeights(lambda: m.weights, m.restore, weights=-1)
    m.loop([best]).run(3)
    assert m.weights == -1 and best.best_epoch == 0


def test_history_records_fields_lr_and_seconds():
    m = Scripted([9, 9, 9, 9, 0.8, 0.7])
    hist = m.loop([], start_epoch=4, fields={"phase": "head"}).run(2)
    assert [r["epoch"] for r in hist] == [5, 6]
    assert list(hist[0]) == [
        "epoch",
        "phase",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "lr",
        "seconds",
    ]
    assert hist[0]["val_loss"] == 0.8 and hist[0]["lr"] == 0.1 and hist[0]["seconds"] >= 0


def test_hook_stops_and_sees_each_record():
    seen = []
    m = Scripted([1.0, 0.9, 0.8, 0.7])
    hist = m.loop([Hook(lambda r: seen.append(r["epoch"]) or r["epoch"] == 2)]).run(4)
    assert seen == [1, 2] and len(hist) == 2


def _callbacks(m):
    return [
        ReduceLROnPlateau(m, factor=0.5, patience=0),
        BestWeights(lambda: m.weights, m.restore, 1e-4),
        EarlyStopping(patience=2),
    ]


def test_resume_after_a_kill_trains_like_an_uninterrupted_run():
    losses = [1.0, 0.8, 0.85, 0.7, 0.75, 0.76, 0.77, 0.6]
    m = Scripted(losses)
    full = m.loop(_callbacks(m)).run(8)
    assert len(full) == 7 and m.weights == 4  # stopped after 3 bad epochs; best epoch 4

    class Killed(Exception):
        pass

    saved = {}
    m = Scripted(losses)
    cbs = _callbacks(m)
    loop = m.loop(cbs)

    def checkpoint(record):  # what a caller writes after each epoch (JSON, like finetune's)
        saved["loop"] = json.dumps(loop.state_dict())
        saved["weights"], saved["best"] = m.weights, cbs[1].weights
        saved["lrs"] = [g["lr"] for g in m.param_groups]
        if record["epoch"] == 5:
            raise Killed

    loop.callbacks.append(Hook(checkpoint))
    with pytest.raises(Killed):
        loop.run(8)

    m = Scripted(losses)
    m.weights = saved["weights"]
    for g, lr in zip(m.param_groups, saved["lrs"]):
        g["lr"] = lr
    cbs = _callbacks(m)
    cbs[1].weights = saved["best"]
    loop = m.loop([*cbs, Hook(lambda r: None)])
    loop.load_state_dict(json.loads(saved["loop"]))
    assert loop.epoch == 5 and len(loop.history) == 5
    resumed = loop.run(8)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed] == strip
    assert m.weights == 4 and cbs[2].stopped_epoch == 7

    with pytest.raises(ValueError, match="differ"):
        m.loop([EarlyStopping(1)]).load_state_dict(json.loads(saved["loop"]))


def test_two_phases_share_history_and_best_weights():
    """Fine-tuning's shape: head phase then backbone phase, fresh stopping/plateau per phase,
    best weights over both; the second phase starts from the best of the first."""
    m = Scripted([1.0, 0.7, 0.8, 0.9, 0.75, 0.65, 0.66, 0.67, 0.68])
    history: list[dict] = []
    best = BestWeights(lambda: m.weights, m.restore, 1e-6)
    head = m.loop([best, EarlyStopping(1)], history=history, fields={"phase": "head"})
    head.run(5)
    assert len(history) == 4 and m.weights == 2  # stopped at 4, best (epoch 2) restored
    tune = m.loop(
        [best, EarlyStopping(1)], history=history, start_epoch=head.epoch, fields={"phase": "ft"}
    )
    tune.run(5)
    assert [r["phase"] for r in history] == ["head"] * 4 + ["ft"] * 4
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert best.best_epoch == 6 and m.weights == 6


# ---------------------------------------------------------------------- the heads on the loop
def _fixed_features(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(300, 40)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + 2 * (X[:, 2] > 0.5)
    Xv = rng.normal(size=(80, 40)).astype(np.float32)
    yv = rng.integers(0, 4, len(Xv))  # unlearnable: validation loss is best early, then worse
    return X, y, Xv, yv


def test_mlp_head_stops_at_the_expected_epoch_with_best_weights(one_torch_thread):
    """Regression for the switch to the shared loop (results were bit-identical before/after):
    patience 3 after the best epoch 1 stops at epoch 5; the plateau (lr_patience 1) cut the lr
    after epoch 3; the kept weights are epoch 1's."""
    from stackvision.heads import MLPHead

    X, y, Xv, yv = _fixed_features()
    h = MLPHead(hidden=32, epochs=40, patience=3, lr_patience=1, lr=1e-2).fit(
        X, y, 4, Xv, yv, seed=3
    )
    assert [r["epoch"] for r in h.history] == [1, 2, 3, 4, 5] and h.best_epoch == 1
    assert [r["lr"] for r in h.history] == pytest.approx([1e-2, 1e-2, 1e-2, 3e-3, 3e-3])
    p = h.predict_proba(Xv)
    loss = -np.mean(np.log(p[np.arange(len(yv)), yv]))
    assert loss == pytest.approx(h.history[0]["val_loss"], rel=1e-5)


def test_streaming_head_stops_at_the_expected_epoch_with_best_weights(tmp_path, one_torch_thread):
    from stackvision.shards import ShardedFeatures
    from stackvision.streaming import fit_streaming

    _, y, _ = _generated(tmp_path / "s", n=300, dims=(24,), sep=0.5)
    feats = ShardedFeatures(str(tmp_path / "s"))
    params = {"hidden": 64, "epochs": 30, "patience": 1, "lr": 0.05, "chunk_rows": 50}
    tr, va = np.arange(240), np.arange(240, 300)
    head, vp = fit_streaming(feats, y, "mlp", params, tr, va, 4, seed=1)
    losses = [r["val_loss"] for r in head.history]
    assert len(losses) == 10 and head.best_epoch == 8  # two epochs worse than epoch 8: stop
    assert losses[8] > losses[7] and losses[9] > losses[7]
    loss = -np.mean(np.log(vp[np.arange(len(va)), y[va]]))
    assert loss == pytest.approx(losses[7], rel=1e-6)  # the hold-out answer is epoch 8's weights
