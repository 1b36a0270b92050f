"""``stackvision train``: train a stacked-features classifier.

Train heads on stacked cached features with k-fold CV and flip TTA; write a model directory.
"""

from __future__ import annotations

import os
import time

from ...errors import StackvisionError
from .. import options as opt
from ..display import METRIC_COLS, report_problems, say, table

COMPARE_COLS = (
    "model",
    "views",
    "heads",
    "cv_accuracy",
    "cv_log_loss",
    "val_accuracy",
    "val_log_loss",
)


def add_arguments(t) -> None:
    opt.add_labelled_data(t, required=False)
    opt.add_out(t, "MODEL", "model directory to write")
    opt.add_backbone_options(t)
    t.add_argument(
        "--head",
        default="logreg",
        choices=["logreg", "mlp", "auto"],
        help="classifier head; auto: logreg C or mlp chosen by inner 3-fold CV on the training"
        " features (default: logreg)",
    )
    t.add_argument(
        "--head-param",
        action="append",
        type=_head_param,
        metavar="KEY=VALUE",
        help="head hyper-parameter, e.g. C=0.1 or hidden=1024 (repeatable)",
    )
    t.add_argument(
        "--folds",
        type=int,
        default=5,
        help="stratified k-fold; the model is the ensemble of the K fold heads (0: no k-fold; "
        "default: 5)",
    )
    t.add_argument("--val", metavar="DATA", help="separate labelled validation folder")
    t.add_argument(
        "--val-split", type=float, help="hold out this fraction for validation (with --folds 0)"
    )
    opt.add_tta(t, "train on original+flipped features and average both at prediction")
    t.add_argument(
        "--train-views",
        type=int,
        default=0,
        metavar="K",
        help="also fit the heads on K random crops of each training image (cached like the "
        "other views; scores and predictions use the original views; default: 0)",
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
    opt.add_exclude(t)
    t.add_argument(
        "--group-duplicates",
        action="store_true",
        help="keep near-duplicate images (as the doctor finds them) in one fold, as identical "
        "ones always are",
    )
    t.add_argument(
        "--no-doctor", action="store_true", help="no 'Data doctor' section in the report"
    )
    t.add_argument(
        "--from-shards",
        metavar="DIR",
        help="train on a sharded feature set (extract --export-shards) streamed from disk, for"
        " features larger than memory: one head, hold-out --val-split (default 0.1)",
    )
    t.add_argument(
        "--preset",
        choices=["fast", "default", "best"],
        help="fast: lite0, no flip; default: the stack; best: the stack, then LP-FT fine-tuned "
        "members and a 'best' ensemble within --time-limit (backbones/--tta given win)",
    )
    t.add_argument(
        "--time-limit",
        type=opt.duration,
        metavar="DURATION",
        help="with --preset best: the whole run's budget, e.g. 20m, 1h (default: 1h)",
    )
    opt.add_runtime_options(t)
    t.set_defaults(backbones=None, tta=None)  # unset: the preset's, else the usual defaults


def _head_param(text: str) -> tuple[str, object]:
    k, v = opt.kv(text)
    return k, opt.parse_value(v)


def _head_params(args) -> dict | None:
    return dict(args.head_param or []) or None


def _check_head(args) -> None:
    """Head parameters are checked before any work, worded with the flag."""
    from ...heads import make_head
    from ...params import InvalidParameter

    if args.head == "auto":
        if args.head_param or args.from_shards:
            raise StackvisionError(
                "--head auto chooses the head's parameters itself and does not stream shards",
                "drop --head-param / --from-shards, or name the head (--head logreg)",
            )
        return
    try:
        params = _head_params(args)
        if args.from_shards:  # the streaming loop takes some of them (epochs, lr, ...)
            from ...streaming import split_params

            params, _ = split_params(args.head, params)
        make_head(args.head, params)
    except InvalidParameter as exc:
        raise exc.flag(f"--head-param {exc.name}") from None


def run(args) -> int:
    started = time.monotonic()
    _apply_preset(args)
    _check_head(args)
    opt.check_out(args, "model", opt.data_inputs(args))
    if args.from_shards:
        return _run_shards(args)
    if args.preset == "best":
        from ..train_best import run_best

        return run_best(args, started)
    from ...classifier import StackedClassifier
    from ...metrics import summary_row

    model = StackedClassifier(
        opt.backbone_list(args.backbones),
        head=args.head,
        head_params=_head_params(args),
        folds=args.folds,
        val_split=args.val_split,
        tta=args.tta,
        train_views=args.train_views,
        pool=args.pool,
        class_weight=args.class_weight,
        calibrate=not args.no_calibrate,
        group_duplicates=args.group_duplicates,
        weights=dict(args.weights or []),
        seed=args.seed,
        runtime=opt.runtime(args),
    )
    opt.validate_estimator(model)
    data = opt.listing(args)
    val = opt.validation_data(args)
    t0 = time.perf_counter()
    say(
        args,
        f"training on {len(data)} images, {len(set(data.labels))} classes, backbones "
        f"{args.backbones}, head {args.head}, "
        f"{'folds ' + str(args.folds) if args.folds >= 2 else 'no k-fold'}, TTA {args.tta}"
        + (f", {args.train_views} training views" if args.train_views else ""),
    )
    if getattr(args, "corrections", None):
        c = args.corrections
        say(args, f"corrections from {c['file']}: {c['excluded']} left out, {c['relabelled']} relabelled")  # fmt: skip
    model.fit(data.paths, data.labels, val=val)
    model.problems_ = data.problems + model.problems_
    if not args.no_doctor and model.metrics_ and model.eval_:  # no report, no section
        _doctor_section(args, model)
    path = model.save(args.out)
    st = model.extract_stats_
    report_problems(model.problems_, args)
    dup = (model.metrics_ or {}).get("duplicates")
    if dup and dup["groups"]:
        say(args, f"duplicates: {dup['groups']} set(s) of identical images ({dup['files']} files), "
                  "each kept on one side of every split (listed in metrics.json)")  # fmt: skip
    say(
        args,
        f"features: {st['n_computed']} images computed, {st['n_cached']} from cache"
        + (
            f", {st['images_per_second']} img/s = "
            f"{st['images_per_second'] * len(model.specs_) * model.n_views_:.1f} backbone passes/s"
            if st["images_per_second"]
            else ""
        ),
    )
    if model.head_selection_:
        from ...head_select import describe

        say(args, f"head auto: {describe(model.head_selection_)}")
    rows = []
    if model.metrics_:
        rows.append({"evaluated on": model.metrics_["validation"], **summary_row(model.metrics_)})
        if "holdout" in model.metrics_:
            rows.append(
                {"evaluated on": "--val (fold ensemble)", **summary_row(model.metrics_["holdout"])}
            )
    if args.compare:
        from ...atomic import write_json
        from ...compare import compare_table

        comparison = compare_table(model)
        say(args, "\ncomparison (same splits, calibrated):")
        say(args, table(comparison, [c for c in COMPARE_COLS if any(c in r for r in comparison)]))
        write_json(os.path.join(path, "compare.json"), comparison)
    if rows:
        say(args, "")
        say(args, table(rows, METRIC_COLS))
    say(
        args,
        f"\nmodel written to {path} ({time.perf_counter() - t0:.1f} s); report: "
        f"{os.path.join(path, 'report', 'report.html')}",
    )
    return 0


def _apply_preset(args) -> None:
    """A preset's backbones and TTA where the command line does not give them (no preset:
    the default stack, flip)."""
    from ...presets import preset_settings

    if args.time_limit and args.preset != "best":
        raise StackvisionError(
            "--time-limit budgets --preset best (a plain stack is not cut short)",
            "add --preset best, or drop --time-limit",
        )
    if args.preset and args.from_shards:
        raise StackvisionError("--preset needs images (not --from-shards)", "drop --preset")
    if args.train_views and args.from_shards:
        raise StackvisionError(
            "--train-views needs images: shards hold the features already extracted",
            "drop --train-views, or train on the image folder",
        )
    preset = preset_settings(args.preset or "default")
    args.backbones = preset["backbones"] if args.backbones is None else args.backbones
    args.tta = args.tta or preset["tta"]


def _doctor_section(args, model) -> None:
    """The doctor on the fitted model's features: a report section, a one-line summary."""
    from ...doctor import from_model
    from ...doctor_output import csv_text, report_section

    d = from_model(model)
    sec = report_section(d)
    sec.files["doctor.csv"] = csv_text(d).encode("utf-8")
    model.report_sections = [sec]
    s = d.summary()
    say(args, f"data doctor: {s['label_issues']} likely label error(s), {s['leaks']} train/val "
              f"leak(s), {s['duplicate_groups']} near-duplicate group(s), {s['outliers']} "
              "outlier(s) (report section 'Data doctor', report/doctor.csv)")  # fmt: skip
    if d.leaks:
        say(args, f"LEAKS: {len(d.leaks)} near-duplicate group(s) across the training data and "
                  "--val: the --val scores are inflated (see `stackvision doctor`)")  # fmt: skip


def _run_shards(args) -> int:
    from ...metrics import summary_row
    from ...streaming import train_from_shards

    if args.data or args.labels or args.val or args.exclude or args.group_duplicates:
        raise StackvisionError(
            "--from-shards trains on the shards' features and labels only",
            "drop DATA/--labels/--val/--exclude/--group-duplicates (or drop --from-shards)",
        )
    if args.folds not in (0, 5) or args.compare:
        raise StackvisionError(
            "--from-shards trains one head on a hold-out split (no --folds, no --compare)",
            "use --val-split to size the hold-out",
        )
    t0 = time.perf_counter()
    model = train_from_shards(
        args.from_shards,
        head=args.head,
        head_params=_head_params(args),
        val_split=args.val_split or 0.1,
        class_weight=args.class_weight,
        calibrate=not args.no_calibrate,
        weights=dict(args.weights or []),
        seed=args.seed,
        runtime=opt.runtime(args),
    )
    path = model.save(args.out)
    sh = model.shards_
    say(args, f"streamed {sh['n_rows']} rows from {sh['n_shards']} shard(s) in {args.from_shards}")
    d = model.metrics_["duplicates"]
    if d["groups"] or d["label_conflicts"]:
        say(
            args,
            f"{d['extra_copies']} duplicate row(s) kept on one side of the hold-out; "
            f"{d['label_conflicts']} left out (same image, two labels)",
        )
    rows = [{"evaluated on": model.metrics_["validation"], **summary_row(model.metrics_)}]
    say(args, table(rows, METRIC_COLS))
    say(args, f"\nmodel written to {path} ({time.perf_counter() - t0:.1f} s)")
    return 0
