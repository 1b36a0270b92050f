"""The ``stackvision`` command: verbs over the library API. User errors -> one line, exit 2."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

from . import __version__
from .errors import StackvisionError
from .runtime import Runtime

EPILOG = "Every verb has --help. Docs: README.md and docs/ in the project."


# ---------------------------------------------------------------------- shared options
def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--cache",
        metavar="DIR",
        help="feature cache folder (default: $STACKVISION_CACHE or the user cache dir)",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="auto (GPU when torch sees one), cpu, cuda, cuda:N (default: auto)",
    )
    g.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "torch", "onnx", "openvino"],
        help="inference engine: auto = torch on a GPU, else the fastest CPU engine installed "
        "(openvino, onnx, torch) (default: auto)",
    )
    g.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16", "int8"],
        help="backbone precision: int8 is quantised on ~300 of your images, bf16 needs a CPU "
        "with AVX-512 BF16 (default: fp32 for training; a saved model's own for predict)",
    )
    g.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (default: 32)"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decode threads (default: min(4, cores); min(16, cores) when the model is on a GPU)",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image instead of skipping it",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r = p.add_argument_group("runner (where extraction runs; see docs/scaling.md)")
    r.add_argument(
        "--runner",
        default="local",
        choices=["local", "ray"],
        help="local: this process; ray: Ray Data tasks and actors (pip install 'stackvision[ray]')"
        " (default: local)",
    )
    r.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join (HOST:6379, ray://HOST:10001 or auto; default: a local Ray)",
    )
    r.add_argument(
        "--ray-actors",
        type=int,
        metavar="N",
        help="backbone actors per backbone (default: one per GPU, or the cluster's CPUs less one)",
    )


def add_labelled_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "data",
        nargs="?" if not required else None,
        metavar="DATA",
        help="folder with one subfolder per class (or a labels CSV)",
    )
    p.add_argument(
        "--labels",
        metavar="CSV",
        help="labels CSV (e.g. Kaggle 'id,breed'); images in --images or DATA",
    )
    p.add_argument(
        "--images",
        metavar="DIR",
        help="folder of the images named in --labels (default: the CSV's folder)",
    )
    p.add_argument("--id-col", help="CSV column with the image id or path (default: detected)")
    p.add_argument("--label-col", help="CSV column with the class label (default: detected)")


def _runtime(args) -> dict:
    return {
        "cache_dir": args.cache,
        "device": args.device,
        "engine": args.engine,
        # None: a saved model's own precision (an int8 model's heads expect int8 features)
        **({"precision": args.precision} if args.precision else {}),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "strict": args.strict,
        "runner": args.runner,
        "ray_address": args.ray_address,
        "ray_actors": args.ray_actors,
        "progress": not args.quiet
        and sys.stderr.isatty()
        or os.environ.get("STACKVISION_PROGRESS") == "1",
    }


def _listing(args, data=None):
    from .data import load_labelled

    return load_labelled(
        data if data is not None else args.data,
        args.labels,
        args.images,
        args.id_col,
        args.label_col,
    )


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    sep = "  ".join("-" * w for w in widths)
    numeric = [
        all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in cols
    ]
    body = [
        "  ".join(
            v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))
        )
        for row in cells
    ]
    return "\n".join([line, sep, *body])


def _say(args, text: str = "") -> None:
    print(
        text, file=sys.stderr if getattr(args, "stdout_is_data", False) else sys.stdout, flush=True
    )


def _report_problems(problems, args) -> None:
    if problems:
        _say(args, f"warning: {len(problems)} file(s) left out:")
        for p in problems[:10]:
            _say(args, f"  {p.path}: {p.reason}")
        if len(problems) > 10:
            _say(
                args, f"  ... and {len(problems) - 10} more (listed in metrics.json and the report)"
            )


# ---------------------------------------------------------------------- verbs
def cmd_backbones(args) -> int:
    from .backbones import list_backbones, resolve

    specs = [resolve(n) for n in args.names] if args.names else list_backbones()
    rows = [
        {
            "name": s.name,
            "architecture": s.architecture,
            "input": s.preprocess.input_size,
            "dim": s.feature_dim,
            "source": s.source,
            "offline-ready": "yes" if s.offline_ready else "no",
        }
        for s in specs
    ]
    if args.json:
        print(
            json.dumps(
                [{**r, "preprocess": s.preprocess.to_dict()} for r, s in zip(rows, specs)], indent=2
            )
        )
    else:
        print(_table(rows, ["name", "architecture", "input", "dim", "source", "offline-ready"]))
        print(
            "\nAny timm model works as timm:<name>; weights download when online or come from --weights NAME=PATH."
        )
    return 0


def _backbone_list(text: str) -> list[str]:
    return [b.strip() for b in text.split(",") if b.strip()]


def cmd_extract(args) -> int:
    from .backbones import resolve
    from .cache import FeatureCache
    from .data import from_paths
    from .runners import extract_features

    rt = _runtime(args)
    if args.labels or (args.data and os.path.isdir(args.data) and _looks_labelled(args.data)):
        listing = _listing(args)
    else:
        listing = from_paths([args.data] if args.data else [])
    specs = [resolve(b, dict(args.weights or [])) for b in _backbone_list(args.backbones)]
    views = ("orig", "flip") if args.tta == "flip" else ("orig",)
    t0 = time.perf_counter()
    feats = extract_features(
        listing.paths,
        specs,
        runner=rt["runner"],
        ray_address=rt["ray_address"],
        ray_actors=rt["ray_actors"],
        views=views,
        pool=args.pool,
        cache=FeatureCache(rt["cache_dir"]),
        engine=rt["engine"],
        precision=rt.get("precision", "fp32"),
        device=rt["device"],
        batch_size=rt["batch_size"],
        workers=rt["workers"],
        strict=rt["strict"],
        progress=rt["progress"],
        assemble=False,  # the features stay in the cache (and in --export-shards)
    )
    st = feats.stats
    _report_problems(listing.problems + feats.problems, args)
    print(
        _table(
            [
                {
                    "images": st["n_images"],
                    "used": st["n_used"],
                    "bad": st["n_bad"],
                    "cached": st["n_cached"],
                    "computed": st["n_computed"],
                    "img/s": st["images_per_second"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            ],
            ["images", "used", "bad", "cached", "computed", "img/s", "seconds"],
        )
    )
    print(f"cache: {FeatureCache(rt['cache_dir']).root}")
    if args.export_shards:
        from .engines import numbers_id
        from .shards import export_shards

        labels = [listing.labels[i] for i in feats.index] if listing.labels else None
        index = export_shards(
            args.export_shards,
            feats.hashes,
            specs,
            views=views,
            pool=args.pool,
            cache=FeatureCache(rt["cache_dir"]),
            numbers=numbers_id(rt["engine"], rt.get("precision", "fp32")),
            labels=labels,
            classes=listing.classes if labels else None,
            rows_per_shard=args.shard_rows,
        )
        print(
            f"shards: {args.export_shards} ({index['n_rows']} rows x {len(views)} view(s) x "
            f"{index['dim']} dims in {len(index['shards'])} shard(s))"
        )
    return 0


def _looks_labelled(folder: str) -> bool:
    return any(os.path.isdir(os.path.join(folder, d)) for d in os.listdir(folder))


def cmd_train_shards(args) -> int:
    from .metrics import summary_row
    from .streaming import train_from_shards

    if args.data or args.labels or args.val:
        raise StackvisionError(
            "--from-shards trains on the shards' features and labels only",
            "drop DATA/--labels/--val (or drop --from-shards)",
        )
    if args.folds not in (0, 5) or args.compare:
        raise StackvisionError(
            "--from-shards trains one head on a hold-out split (no --folds, no --compare)",
            "use --val-split to size the hold-out",
        )
    params = {k: _parse_value(v) for k, v in (args.head_param or [])}
    t0 = time.perf_counter()
    model = train_from_shards(
        args.from_shards,
        head=args.head,
        head_params=params or None,
        val_split=args.val_split or 0.1,
        class_weight=args.class_weight,
        calibrate=not args.no_calibrate,
        weights=dict(args.weights or []),
        seed=args.seed,
        runtime=Runtime(**_runtime(args)),
    )
    path = model.save(args.out)
    sh = model.shards_
    _say(args, f"streamed {sh['n_rows']} rows from {sh['n_shards']} shard(s) in {args.from_shards}")
    rows = [{"evaluated on": model.metrics_["validation"], **summary_row(model.metrics_)}]
    _say(args, _table(rows, ["evaluated on", "n_images", "accuracy", "top5_accuracy", "log_loss"]))
    _say(args, f"\nmodel written to {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_train(args) -> int:
    from .classifier import StackedClassifier
    from .metrics import summary_row

    if args.from_shards:
        return cmd_train_shards(args)

    listing = _listing(args)
    val = None
    if args.val:
        from .data import load_labelled

        vl = load_labelled(args.val)
        val = (vl.paths, vl.labels)
    rt = _runtime(args)
    params = {k: _parse_value(v) for k, v in (args.head_param or [])}
    model = StackedClassifier(
        _backbone_list(args.backbones),
        head=args.head,
        head_params=params or None,
        folds=args.folds,
        val_split=args.val_split,
        tta=args.tta,
        pool=args.pool,
        class_weight=args.class_weight,
        calibrate=not args.no_calibrate,
        weights=dict(args.weights or []),
        seed=args.seed,
        runtime=Runtime(**rt),
    )
    t0 = time.perf_counter()
    n_classes = len(set(listing.labels))
    _say(
        args,
        f"training on {len(listing)} images, {n_classes} classes, backbones {args.backbones}, head {args.head}, "
        f"{'folds ' + str(args.folds) if args.folds >= 2 else 'no k-fold'}, TTA {args.tta}",
    )
    model.fit(listing.paths, listing.labels, val=val)
    model.problems_ = listing.problems + model.problems_
    path = model.save(args.out)
    st = model.extract_stats_
    _report_problems(model.problems_, args)
    _say(
        args,
        f"features: {st['n_computed']} images computed, {st['n_cached']} from cache"
        + (f", {st['images_per_second']} img/s" if st["images_per_second"] else ""),
    )
    rows = []
    if model.metrics_:
        rows.append({"evaluated on": model.metrics_["validation"], **summary_row(model.metrics_)})
        if "holdout" in model.metrics_:
            rows.append(
                {"evaluated on": "--val (fold ensemble)", **summary_row(model.metrics_["holdout"])}
            )
    if args.compare:
        from .compare import compare_table

        table = compare_table(model)
        _say(args, "\ncomparison (same splits, calibrated):")
        _say(
            args,
            _table(
                table,
                [
                    c
                    for c in (
                        "model",
                        "views",
                        "heads",
                        "cv_accuracy",
                        "cv_log_loss",
                        "val_accuracy",
                        "val_log_loss",
                    )
                    if any(c in r for r in table)
                ],
            ),
        )
        from .model_dir import write_json

        write_json(os.path.join(path, "compare.json"), table)
    if rows:
        _say(args, "")
        _say(
            args,
            _table(rows, ["evaluated on", "n_images", "accuracy", "top5_accuracy", "log_loss"]),
        )
    _say(
        args,
        f"\nmodel written to {path} ({time.perf_counter() - t0:.1f} s); report: {os.path.join(path, 'report', 'report.html')}",
    )
    return 0


def load_any_model(path: str, args):
    """Load a model directory of any kind, with the runtime options from ``args``."""
    from .models import load_model

    return load_model(path, weights=dict(getattr(args, "weights", None) or []), **_runtime(args))


def cmd_predict(args) -> int:
    from .data import from_paths

    model = load_any_model(args.model, args)
    listing = from_paths(args.inputs)
    pred = model.predict_paths(listing.paths)
    problems = listing.problems + pred.problems
    args.stdout_is_data = not args.out
    _report_problems(problems, args)
    classes = pred.classes
    if args.format == "kaggle":
        header = ["id", *classes]
        rows = [
            [os.path.splitext(os.path.basename(p))[0], *(f"{v:.6f}" for v in row)]
            for p, row in zip(pred.paths, pred.proba)
        ]
    else:
        k = min(args.top_k, len(classes))
        header = ["path", *[f"{w}_{i + 1}" for i in range(k) for w in ("class", "prob")]]
        rows = [
            [p, *[x for c, v in top for x in (c, f"{v:.6f}")]]
            for p, top in zip(pred.paths, pred.top_k(k))
        ]
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
        os.replace(tmp, args.out)
        _say(
            args,
            f"{len(rows)} predictions written to {args.out}"
            + (f" ({len(problems)} file(s) left out)" if problems else ""),
        )
    else:
        w = csv.writer(sys.stdout)
        w.writerow(header)
        w.writerows(rows)
    return 0


def cmd_evaluate(args) -> int:
    import numpy as np

    from .metrics import classification_metrics, summary_row
    from .model_dir import write_json
    from .report import write_report

    model = load_any_model(args.model, args)
    listing = _listing(args)
    unknown = sorted(set(listing.labels) - set(model.classes_))
    if unknown:
        raise StackvisionError(
            f"labels not known to the model: {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else ""),
            f"the model's classes are: {', '.join(model.classes_[:10])}"
            + (" ..." if len(model.classes_) > 10 else ""),
        )
    pred = model.predict_paths(listing.paths)
    label_of = dict(zip(listing.paths, listing.labels))
    index = {c: i for i, c in enumerate(model.classes_)}
    y = np.asarray([index[label_of[p]] for p in pred.paths], np.int64)
    metrics = {
        "validation": f"evaluate on {listing.source}",
        **classification_metrics(y, pred.proba, model.classes_),
    }
    problems = listing.problems + pred.problems
    metrics["problems"] = [p.__dict__ for p in problems]
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    write_report(
        os.path.join(args.out, "report"),
        metrics,
        pred.paths,
        y,
        pred.proba,
        model.classes_,
        problems=problems,
        title=f"stackvision evaluation: {os.path.basename(os.path.abspath(args.model))}",
    )
    _report_problems(problems, args)
    print(_table([summary_row(metrics)], ["n_images", "accuracy", "top5_accuracy", "log_loss"]))
    print(
        f"metrics: {os.path.join(args.out, 'metrics.json')}; report: {os.path.join(args.out, 'report', 'report.html')}"
    )
    return 0


# Runtime settings for verbs without the runtime options (export builds on the CPU).
_NO_RUNTIME = {
    "cache": None,
    "device": "cpu",
    "engine": "torch",
    "precision": "fp32",
    "batch_size": 32,
    "workers": None,
    "strict": False,
    "quiet": True,
    "runner": "local",
    "ray_address": None,
    "ray_actors": None,
}


def cmd_export(args) -> int:
    from .export import export_model

    model = load_any_model(args.model, args)
    t0 = time.perf_counter()
    info = export_model(model, args.out, args.format, opset=args.opset, check=not args.no_check)
    inp = info["input"]
    print(
        f"wrote {info['path']} ({info['bytes'] / 1e6:.1f} MB, opset {info['opset']}, "
        f"{info['n_classes']} classes) in {time.perf_counter() - t0:.1f} s"
    )
    print(f"input 'image': uint8 (N, {inp['size']}, {inp['size']}, 3) RGB; {inp['recipe']}")
    print(
        "output 'probabilities': float32 (N, n_classes); class names in metadata stackvision.classes"
    )
    if "max_abs_diff" in info:
        print(f"check: ONNX Runtime vs torch, max |diff| {info['max_abs_diff']:.1e}")
    return 0


def cmd_serve(args) -> int:
    from .serve import API_KEY_ENV, LOOPBACK, Limits, serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    for name in ("max_batch", "max_images", "max_pixels"):
        if getattr(args, name) < 1:
            raise StackvisionError(
                f"--{name.replace('_', '-')} must be at least 1", "e.g. the default"
            )
    if args.max_upload_mb <= 0 or args.max_wait_ms < 0:
        raise StackvisionError(
            "--max-upload-mb must be positive and --max-wait-ms not negative", "e.g. the defaults"
        )
    if args.host not in LOOPBACK and not api_key:
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach this "
            f"address can use the model (set --api-key or {API_KEY_ENV})",
            file=sys.stderr,
        )
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_images=args.max_images,
    )
    print(
        f"serving {args.model} on http://{args.host}:{args.port}/ (API docs: /docs"
        f"{', API key required' if api_key else ''})",
        file=sys.stderr,
        flush=True,
    )
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=api_key,
        limits=limits,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        log_level=args.log_level,
        weights=dict(args.weights or []),
        device=args.device,
    )
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .backbones import DEFAULT_STACK

    p = argparse.ArgumentParser(
        prog="stackvision",
        description="Fine-grained image classification by stacking pretrained models.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"stackvision {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    b = sub.add_parser(
        "backbones",
        help="list the backbone registry",
        description="List backbones: name, input size, feature dim, weights source, offline-ready.",
    )
    b.add_argument(
        "names", nargs="*", help="only these backbones (e.g. lite0 timm:resnet50.a1_in1k)"
    )
    b.add_argument("--json", action="store_true", help="machine-readable output with preprocessing")
    b.set_defaults(func=cmd_backbones)

    def backbone_opts(q, weights=True):
        q.add_argument(
            "--backbones",
            default=",".join(DEFAULT_STACK),
            help=f"comma-separated backbones to stack (default: {','.join(DEFAULT_STACK)})",
        )
        q.add_argument(
            "--pool",
            default="avg",
            choices=["avg", "max", "avgmax"],
            help="global pooling of the last feature map (default: avg)",
        )
        if weights:
            q.add_argument(
                "--weights",
                action="append",
                type=_kv,
                metavar="NAME=PATH",
                help="local checkpoint for a backbone (repeatable)",
            )

    e = sub.add_parser(
        "extract",
        help="fill the feature cache ahead of training",
        description="Compute and cache backbone features for a data set (nothing cached is recomputed).",
    )
    add_labelled_data(e, required=False)
    backbone_opts(e)
    e.add_argument(
        "--tta",
        default="flip",
        choices=["none", "flip"],
        help="also cache horizontally flipped views (default: flip)",
    )
    e.add_argument(
        "--export-shards",
        metavar="DIR",
        help="also write the features as .npy shards + index.json (for data larger than memory;"
        " train on them with train --from-shards DIR)",
    )
    e.add_argument(
        "--shard-rows",
        type=int,
        default=65536,
        metavar="N",
        help="images per shard for --export-shards (default: 65536)",
    )
    add_runtime_options(e)
    e.set_defaults(func=cmd_extract)

    t = sub.add_parser(
        "train",
        help="train a stacked-features classifier",
        description="Train heads on stacked cached features with k-fold CV and flip TTA; write a model directory.",
    )
    add_labelled_data(t, required=False)
    t.add_argument("--out", required=True, metavar="MODEL", help="model directory to write")
    backbone_opts(t)
    t.add_argument(
        "--head",
        default="logreg",
        choices=["logreg", "mlp"],
        help="classifier head (default: logreg)",
    )
    t.add_argument(
        "--head-param",
        action="append",
        type=_kv,
        metavar="KEY=VALUE",
        help="head hyper-parameter, e.g. C=0.1 or hidden=1024 (repeatable)",
    )
    t.add_argument(
        "--folds",
        type=int,
        default=5,
        help="stratified k-fold; the model is the ensemble of the K fold heads (0: no k-fold; default: 5)",
    )
    t.add_argument("--val", metavar="DATA", help="separate labelled validation folder")
    t.add_argument(
        "--val-split", type=float, help="hold out this fraction for validation (with --folds 0)"
    )
    t.add_argument(
        "--tta",
        default="flip",
        choices=["none", "flip"],
        help="train on original+flipped features and average both at prediction (default: flip)",
    )
    t.add_argument(
        "--class-weight", choices=["balanced"], help="weight classes inversely to their frequency"
    )
    t.add_argument(
        "--no-calibrate", action="store_true", help="skip temperature calibration of probabilities"
    )
    t.add_argument(
        "--compare",
        action="store_true",
        help="also report each backbone alone and the stack, with and without TTA",
    )
    t.add_argument("--seed", type=int, default=0, help="seed for splits and heads (default: 0)")
    t.add_argument(
        "--from-shards",
        metavar="DIR",
        help="train on a sharded feature set (extract --export-shards) streamed from disk, for"
        " features larger than memory: one head, hold-out --val-split (default 0.1)",
    )
    add_runtime_options(t)
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser(
        "predict",
        help="predict images or folders",
        description="Predict classes for images and/or folders of images.",
    )
    pr.add_argument("model", metavar="MODEL", help="model directory")
    pr.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files and/or folders (searched recursively)",
    )
    pr.add_argument(
        "--top-k", type=int, default=5, help="classes per image in topk format (default: 5)"
    )
    pr.add_argument(
        "--format",
        default="topk",
        choices=["topk", "kaggle"],
        help="topk: path,class_1,prob_1,...; kaggle: id,<class 1>,...,<class N> (default: topk)",
    )
    pr.add_argument("--out", metavar="CSV", help="write the CSV here (default: stdout)")
    pr.add_argument(
        "--weights",
        action="append",
        type=_kv,
        metavar="NAME=PATH",
        help="local checkpoint for a backbone (repeatable)",
    )
    add_runtime_options(pr)
    pr.set_defaults(func=cmd_predict)

    ev = sub.add_parser(
        "evaluate",
        help="metrics and report on labelled data",
        description="Evaluate a model on labelled data: metrics.json and report/ in --out.",
    )
    ev.add_argument("model", metavar="MODEL", help="model directory")
    add_labelled_data(ev, required=False)
    ev.add_argument(
        "--out", required=True, metavar="DIR", help="folder for metrics.json and report/"
    )
    ev.add_argument(
        "--weights",
        action="append",
        type=_kv,
        metavar="NAME=PATH",
        help="local checkpoint for a backbone (repeatable)",
    )
    add_runtime_options(ev)
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser(
        "export",
        help="export a model to ONNX",
        description="Export a model to one self-contained ONNX file: uint8 RGB images "
        "(N, S, S, 3) -> class probabilities, backbones, heads, fold averaging, flip TTA and "
        "calibration inside; class names and the input contract in its metadata.",
    )
    ex.add_argument("model", metavar="MODEL", help="model directory")
    ex.add_argument("--format", default="onnx", choices=["onnx"], help="(default: onnx)")
    ex.add_argument("--out", required=True, metavar="FILE", help="file to write, e.g. model.onnx")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    ex.add_argument(
        "--no-check",
        action="store_true",
        help="skip running the file in ONNX Runtime against the torch model",
    )
    ex.add_argument(
        "--weights",
        action="append",
        type=_kv,
        metavar="NAME=PATH",
        help="local checkpoint for a backbone (repeatable)",
    )
    ex.set_defaults(func=cmd_export, **_NO_RUNTIME)

    sv = sub.add_parser(
        "serve",
        help="serve a model over HTTP (JSON API and a web page)",
        description="Serve a model over HTTP: POST /predict, GET /model, GET /health, a web page "
        "at / and OpenAPI docs at /docs. Concurrent requests are batched together.",
    )
    sv.add_argument("model", metavar="MODEL", help="model directory")
    sv.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)"
    )
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument(
        "--api-key",
        help="require this key (X-API-Key header) on every route but /health "
        "(default: $STACKVISION_API_KEY; none when unset)",
    )
    sv.add_argument(
        "--max-batch", type=int, default=32, help="most images per forward pass (default: 32)"
    )
    sv.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more requests (default: 5)",
    )
    sv.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="largest image file (default: 10)"
    )
    sv.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="largest image, width x height (default: 40000000)",
    )
    sv.add_argument(
        "--max-images", type=int, default=16, help="most images per request (default: 16)"
    )
    sv.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default: info)",
    )
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    sv.add_argument(
        "--weights",
        action="append",
        type=_kv,
        metavar="NAME=PATH",
        help="local checkpoint for a backbone (repeatable)",
    )
    sv.set_defaults(func=cmd_serve)

    from .cli_finetune import add_parsers as add_finetune_parsers

    add_finetune_parsers(sub)  # finetune, augment-preview, ensemble
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StackvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `stackvision predict ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(
            "interrupted: finished batches are in the feature cache; run the same command again to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
