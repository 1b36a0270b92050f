"""CLI verbs ``finetune``, ``augment-preview`` and ``ensemble`` (registered by :mod:`cli`)."""

from __future__ import annotations

import os
import shutil
import time

from .errors import StackvisionError
from .runtime import Runtime


def _cli():
    from . import cli

    return cli


def work_dir_for(out: str) -> str:
    """Where a fine-tuning run keeps its checkpoint: a sibling of the model directory
    (``MODEL.work``), because the model directory itself is only written, atomically, at the end."""
    out = os.path.abspath(out).rstrip(os.sep)
    return out + ".work"


def _unfreeze(text: str):
    return text if text == "all" else int(text)


def cmd_finetune(args) -> int:
    from .finetune import FineTunedClassifier
    from .metrics import summary_row

    cli = _cli()
    listing = cli._listing(args)
    val = None
    if args.val:
        from .data import load_labelled

        vl = load_labelled(args.val)
        val = (vl.paths, vl.labels)
    rt = cli._runtime(args)
    work = work_dir_for(args.out)
    if args.restart and os.path.isdir(work):
        shutil.rmtree(work)
    model = FineTunedClassifier(
        args.backbone,
        epochs=args.epochs,
        head_epochs=args.head_epochs,
        unfreeze=args.unfreeze,
        lr=args.lr,
        finetune_lr=args.finetune_lr,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        label_smoothing=args.label_smoothing,
        augment=args.augment,
        val_split=args.val_split,
        patience=args.patience,
        input_size=args.input_size,
        tta=args.tta,
        pool=args.pool,
        weights=dict(args.weights or []),
        work_dir=work,
        seed=args.seed,
        batch_size=rt["batch_size"],
        runtime=Runtime(**{**rt, "progress": not args.quiet}),
    )
    t0 = time.perf_counter()
    cli._say(
        args,
        f"fine-tuning {args.backbone} on {len(listing)} images, {len(set(listing.labels))} classes: "
        f"{args.head_epochs} head epoch(s), then {args.epochs} with {args.unfreeze} block(s) "
        f"unfrozen; augment {args.augment or 'none'}; checkpoints in {work}",
    )
    model.fit(listing.paths, listing.labels, val=val)
    if model.resumed_from_epoch_:
        cli._say(args, f"(resumed after epoch {model.resumed_from_epoch_} from {work})")
    model.problems_ = listing.problems + model.problems_
    path = model.save(args.out)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    cli._report_problems(model.problems_, args)
    cli._say(args, "")
    cli._say(
        args,
        cli._table(
            [{"evaluated on": model.metrics_["validation"], **summary_row(model.metrics_)}],
            ["evaluated on", "n_images", "accuracy", "top5_accuracy", "log_loss"],
        ),
    )
    cli._say(
        args,
        f"\nmodel written to {path} ({time.perf_counter() - t0:.1f} s); "
        f"report: {os.path.join(path, 'report', 'report.html')}",
    )
    return 0


def cmd_augment_preview(args) -> int:
    import random

    from .augment import Augment, preview_grid
    from .backbones import resolve

    cli = _cli()
    listing = cli._listing(args) if _labelled(args) else None
    if listing is None:
        from .data import from_paths

        listing = from_paths([args.data])
    aug = Augment.parse(args.augment or "standard")
    pp = resolve(args.backbone).preprocess
    if args.input_size:
        from dataclasses import replace

        pp = replace(pp, input_size=args.input_size)
    paths = list(listing.paths)
    random.Random(args.seed).shuffle(paths)
    out, problems = preview_grid(
        paths[: args.rows], args.out, aug, pp, per_image=args.per_image, seed=args.seed
    )
    cli._report_problems(problems, args)
    print(f"preview of {min(args.rows, len(paths))} image(s) x {args.per_image} written to {out}")
    return 0


def _labelled(args) -> bool:
    d = args.data
    return bool(args.labels) or (
        d is not None
        and os.path.isdir(d)
        and any(os.path.isdir(os.path.join(d, c)) for c in os.listdir(d))
    )


def cmd_ensemble(args) -> int:
    from .ensemble import EnsembleClassifier

    cli = _cli()
    if not args.data and not args.labels:
        raise StackvisionError(
            "ensemble needs held-out labelled data to fit and score the combiners",
            "pass --data DATA with images the members were not trained on",
        )
    listing = cli._listing(args, data=args.data)
    rt = cli._runtime(args)
    ens = EnsembleClassifier(
        args.models,
        method=args.method,
        folds=args.folds,
        seed=args.seed,
        weights=dict(args.weights or []),
        runtime=Runtime(**rt),
    )
    t0 = time.perf_counter()
    cli._say(
        args,
        f"ensembling {len(args.models)} models on {len(listing)} held-out images (method {args.method})",
    )
    ens.fit(listing.paths, listing.labels)
    ens.problems_ = listing.problems + ens.problems_
    path = ens.save(args.out)
    cli._report_problems(ens.problems_, args)
    cli._say(args, "")
    cli._say(
        args,
        cli._table(ens.table_, ["model", "kind", "scored", "n_images", "accuracy", "log_loss"]),
    )
    if ens.weights_ is not None:
        w = ", ".join(f"{n}={v:.3f}" for n, v in zip(ens.member_names_, ens.weights_))
        cli._say(args, f"\nweighted-average weights: {w}")
    cli._say(
        args,
        f"kept method: {ens.method_}\nensemble written to {path} "
        f"({time.perf_counter() - t0:.1f} s); table: {os.path.join(path, 'comparison.json')}",
    )
    return 0


# ---------------------------------------------------------------------- parsers
def add_parsers(sub) -> None:
    cli = _cli()

    f = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained backbone with a new head",
        description="Fine-tune a pretrained backbone: head only first (backbone frozen), then the "
        "top N blocks at a lower learning rate. Early stopping on validation loss, "
        "reduce-LR-on-plateau, best checkpoint kept; rerun the same command to resume.",
    )
    cli.add_labelled_data(f, required=False)
    f.add_argument("--out", required=True, metavar="MODEL", help="model directory to write")
    f.add_argument("--backbone", default="lite0", help="backbone to fine-tune (default: lite0)")
    f.add_argument(
        "--epochs", type=int, default=10, help="fine-tuning epochs after the head (default: 10)"
    )
    f.add_argument(
        "--head-epochs",
        type=int,
        default=3,
        help="epochs training only the head, backbone frozen (default: 3)",
    )
    f.add_argument(
        "--unfreeze",
        type=_unfreeze,
        default=2,
        metavar="N|all",
        help="backbone blocks (from the top) trained in phase 2, or 'all' (default: 2)",
    )
    f.add_argument(
        "--lr", type=float, default=1e-3, help="head-phase learning rate (default: 1e-3)"
    )
    f.add_argument("--finetune-lr", type=float, help="phase-2 learning rate (default: --lr / 10)")
    f.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    f.add_argument("--dropout", type=float, default=0.2, help="dropout before the dense layer")
    f.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing")
    f.add_argument(
        "--augment",
        nargs="?",
        const="standard",
        default=None,
        metavar="PRESET[,k=v]",
        help="training augmentation: light, standard (bare --augment), strong, optionally with "
        "overrides e.g. standard,rotation=25 (default: none)",
    )
    f.add_argument("--val", metavar="DATA", help="separate labelled validation folder")
    f.add_argument(
        "--val-split",
        type=float,
        default=0.15,
        help="fraction held out for early stopping without --val (default: 0.15)",
    )
    f.add_argument("--patience", type=int, default=3, help="early-stopping patience (epochs)")
    f.add_argument(
        "--input-size",
        type=int,
        help="train and predict at this image size instead of the backbone's (faster on a CPU)",
    )
    f.add_argument(
        "--tta",
        default="flip",
        choices=["none", "flip"],
        help="average original and flipped image at prediction (default: flip)",
    )
    f.add_argument("--pool", default="avg", choices=["avg", "max", "avgmax"], help="global pooling")
    f.add_argument(
        "--weights",
        action="append",
        type=cli._kv,
        metavar="NAME=PATH",
        help="local checkpoint for the backbone",
    )
    f.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    f.add_argument(
        "--restart", action="store_true", help="ignore an existing checkpoint and start over"
    )
    f.add_argument(
        "--keep-work", action="store_true", help="keep MODEL.work (the checkpoint) after success"
    )
    cli.add_runtime_options(f)
    f.set_defaults(func=cmd_finetune)

    a = sub.add_parser(
        "augment-preview",
        help="a PNG grid of training augmentations",
        description="Write a grid: a few images of DATA, each original followed by augmented copies.",
    )
    cli.add_labelled_data(a, required=False)
    a.add_argument("--out", required=True, metavar="PNG", help="image file to write")
    a.add_argument(
        "--augment", default="standard", metavar="PRESET[,k=v]", help="(default: standard)"
    )
    a.add_argument("--backbone", default="lite0", help="whose input size/crop to use")
    a.add_argument("--input-size", type=int, help="override the backbone's input size")
    a.add_argument("--rows", type=int, default=4, help="images shown, one per row (default: 4)")
    a.add_argument("--per-image", type=int, default=6, help="augmented copies per row")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("-q", "--quiet", action="store_true")
    a.set_defaults(func=cmd_augment_preview)

    e = sub.add_parser(
        "ensemble",
        help="combine saved models (any kind) on held-out data",
        description="Combine models by mean, weighted mean (weights fitted to minimise log loss) "
        "and a learned combiner, fitted on held-out DATA the members were not trained on. "
        "Prints each member and each method on the same images (combiners scored out-of-fold).",
    )
    e.add_argument("models", nargs="+", metavar="MODEL", help="model directories (two or more)")
    e.add_argument("--data", metavar="DATA", help="held-out labelled folder (or labels CSV)")
    e.add_argument("--labels", metavar="CSV", help="labels CSV for --data")
    e.add_argument("--images", metavar="DIR", help="folder of the images in --labels")
    e.add_argument("--id-col", help="CSV id column")
    e.add_argument("--label-col", help="CSV label column")
    e.add_argument("--out", required=True, metavar="ENSEMBLE", help="ensemble directory to write")
    e.add_argument(
        "--method",
        default="all",
        choices=["mean", "weighted", "stacked", "all"],
        help="all: fit every method, keep the best by out-of-fold log loss (default: all)",
    )
    e.add_argument("--folds", type=int, default=5, help="k for out-of-fold scoring (default: 5)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--weights",
        action="append",
        type=cli._kv,
        metavar="NAME=PATH",
        help="local checkpoint for a member's backbone",
    )
    cli.add_runtime_options(e)
    e.set_defaults(func=cmd_ensemble)
