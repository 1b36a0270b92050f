"""Training heads on a sharded feature set that does not fit in memory.

The stacked matrix stays on disk (:class:`stackvision.shards.ShardedFeatures`, memory-mapped);
everything below reads it a chunk at a time, so peak memory is one chunk (``chunk_rows`` images x
views x D floats) plus the head, whatever the number of images:

1. a stratified hold-out of images (``val_split``) for early stopping, calibration and metrics;
2. one pass for the standardisation statistics (float64 sums over the training rows, all views);
3. minibatch AdamW epochs over block-shuffled chunks (shards in random order, rows shuffled within
   each chunk): ``logreg`` is multinomial logistic regression with the same L2 strength as the
   in-memory head (``C``), ``mlp`` is the in-memory MLP's network; early stopping on the hold-out
   loss with the best weights restored;
4. hold-out probabilities (views averaged, as flip TTA does), temperature fitted on them.

The result is an ordinary :class:`LogRegHead` / :class:`MLPHead` (same state arrays), so the model
directory, prediction and serving are unchanged.
"""

from __future__ import annotations

import copy

import numpy as np

from .errors import StackvisionError
from .heads import HEADS, balanced_weights, make_head, softmax
from .shards import ShardedFeatures
from .training import BestWeights, EarlyStopping, TrainingLoop

STREAM_DEFAULTS = {"epochs": 20, "lr": 1e-3, "batch_size": 256, "patience": 3, "chunk_rows": 8192}


def split_params(kind: str, params: dict | None) -> tuple[dict, dict]:
    """Split ``params`` into the head's own and the streaming loop's (epochs, lr, batch_size...)."""
    if kind not in HEADS:
        raise StackvisionError(f"unknown head '{kind}'", f"use one of: {', '.join(HEADS)}")
    params = dict(params or {})
    head_keys = set(make_head(kind).defaults)
    stream = {**STREAM_DEFAULTS}
    if kind == "mlp":  # the MLP's own optimiser settings drive the loop
        mlp = make_head("mlp").defaults
        stream.update({k: mlp[k] for k in ("epochs", "lr", "batch_size", "patience")})
    head = {}
    unknown = []
    for k, v in params.items():
        if k in STREAM_DEFAULTS:
            stream[k] = v
        if k in head_keys:
            head[k] = v
        if k not in STREAM_DEFAULTS and k not in head_keys:
            unknown.append(k)
    if unknown:
        raise StackvisionError(
            f"unknown {kind} head parameter(s) for streaming: {', '.join(sorted(unknown))}",
            f"valid: {', '.join(sorted(head_keys | set(STREAM_DEFAULTS)))}",
        )
    return head, stream


def _scaler(feats: ShardedFeatures, rows: np.ndarray, chunk_rows: int):
    s = np.zeros(feats.dim, np.float64)
    ss = np.zeros(feats.dim, np.float64)
    n = 0
    for _, x in feats.chunks(rows, chunk_rows):
        x = x.reshape(-1, feats.dim).astype(np.float64)
        s += x.sum(0)
        ss += (x * x).sum(0)
        n += len(x)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def fit_streaming(
    feats: ShardedFeatures,
    y: np.ndarray,
    kind: str,
    params: dict | None,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    n_classes: int,
    *,
    class_weight: str | None = None,
    seed: int = 0,
):
    """Fit a head on ``train_rows`` of ``feats`` (all views), early-stopped on ``val_rows``.

    Returns (head, hold-out probabilities (len(val_rows), C), view-averaged).
    """
    import torch
    import torch.nn.functional as F

    head_params, sp = split_params(kind, params)
    head = make_head(kind, head_params)
    chunk, bs = int(sp["chunk_rows"]), int(sp["batch_size"])
    nv, d = feats.n_views, feats.dim
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean, scale = _scaler(feats, train_rows, chunk)
    head.mean_, head.scale_ = mean, scale
    mean_t, scale_t = torch.from_numpy(mean), torch.from_numpy(scale)
    cw = (
        torch.from_numpy(balanced_weights(y[train_rows], n_classes))
        if class_weight == "balanced"
        else None
    )

    if kind == "logreg":
        net = torch.nn.Linear(d, n_classes)
        torch.nn.init.zeros_(net.weight)
        torch.nn.init.zeros_(net.bias)
        # sklearn's objective C * sum(loss) + ||W||^2 / 2, divided by the number of rows.
        l2 = 1.0 / (float(head.params["C"]) * len(train_rows) * nv)
        wd = 0.0
    else:
        net = head._net(d, n_classes)
        l2, wd = 0.0, float(head.params["weight_decay"])
    opt = torch.optim.AdamW(net.parameters(), lr=float(sp["lr"]), weight_decay=wd)
    ls = float(head.params.get("label_smoothing", 0.0))

    def val_proba() -> np.ndarray:
        net.eval()
        out = np.zeros((len(val_rows), n_classes), np.float64)
        pos = {r: i for i, r in enumerate(val_rows.tolist())}
        with torch.no_grad():
            for ids, x in feats.chunks(val_rows, chunk):
                xt = (torch.from_numpy(x.reshape(-1, d)) - mean_t) / scale_t
                z = net(xt).numpy().reshape(len(ids), nv, -1).mean(1)  # validation.AVERAGING
                p = softmax(z.astype(np.float64))
                out[[pos[r] for r in ids.tolist()]] = p
        return out

    yv = y[val_rows]

    def train_epoch(epoch):
        net.train()
        tot, correct, seen = 0.0, 0, 0
        for ids, x in feats.chunks(train_rows, chunk, rng=rng):
            xt = (torch.from_numpy(x.reshape(-1, d)) - mean_t) / scale_t
            yt = torch.from_numpy(np.repeat(y[ids], nv).astype(np.int64))
            perm = torch.from_numpy(rng.permutation(len(yt)))
            for i in range(0, len(perm), bs):
                idx = perm[i : i + bs]
                out = net(xt[idx])
                each = F.cross_entropy(out, yt[idx], reduction="none", label_smoothing=ls)
                loss = (
                    (each * cw[yt[idx]]).sum() / cw[yt[idx]].sum()
                    if cw is not None
                    else each.mean()
                )
                if l2:
                    loss = loss + 0.5 * l2 * net.weight.pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(each.detach().sum())
                correct += int((out.argmax(1) == yt[idx]).sum())
                seen += len(idx)
        return {"loss": tot / max(seen, 1), "accuracy": correct / max(seen, 1)}

    def validate(epoch):
        vp = val_proba()
        return {
            "val_loss": float(-np.mean(np.log(np.clip(vp[np.arange(len(yv)), yv], 1e-12, 1)))),
            "val_accuracy": float(np.mean(vp.argmax(1) == yv)),
        }

    callbacks = [
        BestWeights(lambda: copy.deepcopy(net.state_dict()), net.load_state_dict, 1e-4),
        EarlyStopping(int(sp["patience"]), min_delta=1e-4),
    ]
    lr = float(sp["lr"])  # constant: no plateau schedule when streaming
    TrainingLoop(train_epoch, validate, callbacks, lr=lambda: lr, history=head.history).run(
        int(sp["epochs"])
    )  # ends with the best weights restored
    linears = [net] if kind == "logreg" else [m for m in net if isinstance(m, torch.nn.Linear)]
    layers = [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()) for m in linears]
    if kind == "logreg":
        head.coef_, head.intercept_ = layers[0]
    else:
        head._layers = layers
        head.best_epoch = int(np.argmin([h["val_loss"] for h in head.history])) + 1
    return head, val_proba()


def train_from_shards(
    path: str,
    *,
    head: str = "logreg",
    head_params: dict | None = None,
    val_split: float = 0.1,
    class_weight: str | None = None,
    calibrate: bool = True,
    weights: dict[str, str] | None = None,
    seed: int = 0,
    **runtime,
):
    """A fitted :class:`StackedClassifier` trained by streaming the sharded feature set at ``path``
    (one head, hold-out validation). ``runtime``: options for later predictions (cache_dir...)."""
    from .classifier import StackedClassifier
    from .data import check_trainable
    from .duplicates import find_duplicates
    from .metrics import classification_metrics
    from .validation import apply_temperature, fit_temperature, holdout_split

    feats = ShardedFeatures(path)
    if not feats.classes:
        raise StackvisionError(
            f"the sharded feature set at {path} has no labels",
            "export it from labelled data: stackvision extract DATA --export-shards DIR",
        )
    if not 0 < val_split < 1:
        raise StackvisionError(
            f"--val-split must be between 0 and 1, got {val_split}", "e.g. --val-split 0.1"
        )
    y = feats.labels().astype(np.int64)
    if (y < 0).any():
        raise StackvisionError(f"{int((y < 0).sum())} unlabelled rows in {path}", "export again")
    classes = list(feats.classes)
    # Identical images (one hash, several rows) stay on one side of the hold-out, as in every
    # other split; the same bytes under two labels are left out as problems.
    hashes = feats.hashes()
    dups = find_duplicates(
        [f"shard row {i} (image {h[:12]})" for i, h in enumerate(hashes)],
        hashes,
        [classes[k] for k in y],
        strict=bool(getattr(runtime.get("runtime"), "strict", False)),
    )
    check_trainable([classes[i] for i in np.unique(y[dups.keep])], 0)
    tr, va = holdout_split(y[dups.keep], val_split, seed, groups=dups.groups)
    tr, va = np.sort(dups.keep[tr]), np.sort(dups.keep[va])
    if class_weight == "none":
        class_weight = None
    fitted, vp = fit_streaming(
        feats, y, head, head_params, tr, va, len(classes), class_weight=class_weight, seed=seed
    )
    if feats.views not in (("orig",), ("orig", "flip")):
        raise StackvisionError(f"unsupported views {feats.views} in {path}", "export again")
    model = StackedClassifier(
        [b["name"] for b in feats.backbones],
        head=head,
        head_params=fitted.params,
        folds=0,
        val_split=val_split,
        tta="flip" if len(feats.views) == 2 else "none",
        pool=feats.index.get("pool", "avg"),
        class_weight=class_weight,
        calibrate=calibrate,
        weights=weights,
        seed=seed,
        **runtime,
    )
    model.specs_ = model._specs()
    for spec, saved in zip(model.specs_, feats.backbones):
        want = saved.get("spec", {}).get("weights_id")
        if want and spec.weights_id != want:
            raise StackvisionError(
                f"backbone '{spec.name}' weights here differ from those the shards were made with",
                f"pass the original file with --weights {spec.name}=PATH",
            )
    model.classes_ = classes
    model.heads_ = [fitted]
    model.histories_ = [fitted.history]
    model.temperature_ = fit_temperature(vp, y[va]) if calibrate else 1.0
    vp = apply_temperature(vp, model.temperature_)
    model.metrics_ = {
        "validation": f"hold-out {len(va)} images (streamed from shards)",
        **classification_metrics(y[va], vp, classes),
        "duplicates": dups.summary(),
    }
    model.eval_ = None  # rows are image hashes, not paths: no image report
    model.problems_ = dups.problems
    model.train_paths_, model.train_y_ = [], y[tr]
    model.training_hashes_ = frozenset(hashes[i] for i in tr)
    model.extract_stats_ = {"n_computed": 0, "n_cached": len(y), "images_per_second": None}
    model.shards_ = {"path": path, "n_rows": len(feats), "n_shards": feats.n_shards}
    return model
