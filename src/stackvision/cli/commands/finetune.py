"""``stackvision finetune``: fine-tune a pretrained backbone with a new head.

Fine-tune a pretrained backbone: head only first (backbone frozen), then the top N blocks at a
lower learning rate. Early stopping on validation loss, reduce-LR-on-plateau, best checkpoint
kept; rerun the same command to resume.
"""

from __future__ import annotations

import os
import shutil
import time

from ...errors import StackvisionError
from .. import options as opt
from ..display import METRIC_COLS, report_problems, say, table

# What a fine-tuning work folder may hold; anything else means it is not ours.
WORK_FILES = ("checkpoint.safetensors", "checkpoint.safetensors.tmp")


def work_dir_for(out: str) -> str:
    """Where a fine-tuning run keeps its checkpoint: a sibling of the model directory
    (``MODEL.work``), because the model directory itself is only written, atomically, at the end."""
    return os.path.abspath(out).rstrip(os.sep) + ".work"


def check_work_dir(work: str) -> None:
    """Refuse a ``MODEL.work`` path that holds anything but our checkpoint."""
    if not os.path.lexists(work):
        return
    if not os.path.isdir(work) or os.path.islink(work):
        raise StackvisionError(
            f"{work} (the checkpoint folder of --out) exists and is not a folder stackvision wrote",
            "move it away or choose another --out",
        )
    foreign = sorted(set(os.listdir(work)) - set(WORK_FILES))
    if foreign:
        raise StackvisionError(
            f"{work} (the checkpoint folder of --out) holds files stackvision did not write "
            f"({', '.join(foreign[:3])}); it is never touched",
            "move them away or choose another --out",
        )


#: (flag, type, default, help) of the training hyper-parameters
HYPER_PARAMETERS = (
    ("--epochs", int, 10, "fine-tuning epochs after the head"),
    ("--head-epochs", int, 3, "epochs training only the head, backbone frozen"),
    ("--lr", float, 1e-3, "head-phase learning rate"),
    ("--finetune-lr", float, None, "phase-2 learning rate (default: --lr / 10)"),
    ("--weight-decay", float, 1e-4, "AdamW weight decay"),
    ("--dropout", float, 0.2, "dropout before the dense layer"),
    ("--label-smoothing", float, 0.0, "label smoothing"),
    ("--val-split", float, 0.15, "fraction held out for early stopping without --val"),
    ("--patience", int, 3, "early-stopping patience (epochs)"),
    ("--input-size", int, None, "train and predict at this size instead of the backbone's"),
    ("--lp-C", float, 0.05, "with --head-init lp: C of the linear probe"),
    ("--lr-decay", float, 1.0, "layer-wise lr decay per block from the top (1: none)"),
    ("--ema", float, 0.0, "decay of an average of the weights, e.g. 0.99 (0: off)"),
    ("--mixup", float, 0.0, "mixup Beta(alpha, alpha), e.g. 0.2 (0: off)"),
)


def _unfreeze(text: str):
    return text if text == "all" else int(text)


def add_arguments(f) -> None:
    opt.add_labelled_data(f, required=False)
    opt.add_exclude(f)
    opt.add_out(f, "MODEL", "model directory to write (its checkpoint lives in MODEL.work)")
    f.add_argument("--backbone", default="lite0", help="backbone to fine-tune (default: lite0)")
    f.add_argument(
        "--unfreeze",
        type=_unfreeze,
        default=2,
        metavar="N|all",
        help="backbone blocks (from the top) trained in phase 2, or 'all' (default: 2)",
    )
    opt.add_numbers(f, HYPER_PARAMETERS)
    f.add_argument(
        "--head-init",
        choices=["random", "lp"],
        default="random",
        help="lp: start the head as the logistic regression fitted on the frozen features "
        "(LP-FT), replacing the head epochs (default: random)",
    )
    f.add_argument(
        "--time-limit",
        type=opt.duration,
        metavar="DURATION",
        help="stop cleanly by then (e.g. 600, 20m, 1h), keeping the best weights",
    )
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
    opt.add_tta(f, "average original and flipped image at prediction")
    f.add_argument("--pool", default="avg", choices=["avg", "max", "avgmax"], help="global pooling")
    opt.add_weights(f, "local checkpoint for the backbone")
    f.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    f.add_argument(
        "--restart", action="store_true", help="ignore an existing checkpoint and start over"
    )
    f.add_argument(
        "--keep-work", action="store_true", help="keep MODEL.work (the checkpoint) after success"
    )
    opt.add_runtime_options(f)


def run(args) -> int:
    from ...finetune import FineTunedClassifier
    from ...metrics import summary_row

    opt.check_out(args, "model", opt.data_inputs(args))
    work = work_dir_for(args.out)
    check_work_dir(work)
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
        head_init=args.head_init,
        lp_C=args.lp_C,
        lr_decay=args.lr_decay,
        ema=args.ema,
        mixup=args.mixup,
        time_limit=args.time_limit,
        batch_size=args.batch_size,  # a training parameter too (part of the resume check)
        runtime=opt.runtime(args, progress=not args.quiet),
    )
    opt.validate_estimator(model)
    data = opt.listing(args)
    val = opt.validation_data(args)
    if getattr(args, "corrections", None):
        c = args.corrections
        say(args, f"corrections from {c['file']}: {c['excluded']} left out, {c['relabelled']} relabelled")  # fmt: skip
    if args.restart and os.path.isdir(work):
        shutil.rmtree(work)  # checked above: it holds only our checkpoint
    t0 = time.perf_counter()
    say(
        args,
        f"fine-tuning {args.backbone} on {len(data)} images, {len(set(data.labels))} classes: "
        f"{args.head_epochs} head epoch(s), then {args.epochs} with {args.unfreeze} block(s) "
        f"unfrozen; augment {args.augment or 'none'}; checkpoints in {work}",
    )
    model.fit(data.paths, data.labels, val=val)
    if model.lp_:
        say(args, f"linear probe (start of LP-FT): val_loss {model.lp_['val_loss']:.4f} "
                  f"val_acc {model.lp_['val_accuracy']:.3f}")  # fmt: skip
    if model.deadline_.hit:
        say(args, "stopped by --time-limit; the best weights so far are kept")
    if model.resumed_from_epoch_:
        say(args, f"(resumed after epoch {model.resumed_from_epoch_} from {work})")
    model.problems_ = data.problems + model.problems_
    path = model.save(args.out)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    report_problems(model.problems_, args)
    say(args, "")
    rows = [{"evaluated on": model.metrics_["validation"], **summary_row(model.metrics_)}]
    say(args, table(rows, METRIC_COLS))
    say(
        args,
        f"\nmodel written to {path} ({time.perf_counter() - t0:.1f} s); "
        f"report: {os.path.join(path, 'report', 'report.html')}",
    )
    return 0
