"""``stackvision ensemble``: combine saved models (any kind) on held-out data.

Combine models by mean, weighted mean (weights fitted to minimise log loss) and a learned
combiner, fitted on held-out DATA the members were not trained on. Prints each member and each
method on the same images (combiners scored out-of-fold).
"""

from __future__ import annotations

import os
import time

from ...errors import StackvisionError
from .. import options as opt
from ..display import report_problems, say, table


def add_arguments(e) -> None:
    e.add_argument("models", nargs="+", metavar="MODEL", help="model directories (two or more)")
    e.add_argument("--data", metavar="DATA", help="held-out labelled folder (or labels CSV)")
    opt.add_labels_csv(e, "--data")
    opt.add_out(e, "ENSEMBLE", "ensemble directory to write")
    e.add_argument(
        "--method",
        default="all",
        choices=["mean", "weighted", "calibrated", "stacked", "all", "best"],
        help="calibrated: member weights + a temperature per member; best: the lowest "
        "out-of-fold log loss among each member alone and the combiners, never below the best "
        "member; all: every combiner, keep the best by out-of-fold log loss (default: all)",
    )
    e.add_argument("--folds", type=int, default=5, help="k for out-of-fold scoring (default: 5)")
    e.add_argument(
        "--seed", type=int, default=0, help="seed for the out-of-fold splits (default: 0)"
    )
    opt.add_weights(e, "local checkpoint for a member's backbone")
    opt.add_runtime_options(e)


def run(args) -> int:
    from ...ensemble import EnsembleClassifier

    if not args.data and not args.labels:
        raise StackvisionError(
            "ensemble needs held-out labelled data to fit and score the combiners",
            "pass --data DATA with images the members were not trained on",
        )
    opt.check_out(args, "model", opt.data_inputs(args))
    ens = EnsembleClassifier(
        args.models,
        method=args.method,
        folds=args.folds,
        seed=args.seed,
        weights=dict(args.weights or []),
        runtime=opt.runtime(args),
    )
    opt.validate_estimator(ens)
    data = opt.listing(args, data=args.data)
    t0 = time.perf_counter()
    say(
        args,
        f"ensembling {len(args.models)} models on {len(data)} held-out images "
        f"(method {args.method})",
    )
    ens.fit(data.paths, data.labels)
    ens.problems_ = data.problems + ens.problems_
    path = ens.save(args.out)
    report_problems(ens.problems_, args)
    say(args, "")
    say(args, table(ens.table_, ["model", "kind", "scored", "n_images", "accuracy", "log_loss"]))
    if ens.weights_ is not None:
        w = ", ".join(f"{n}={v:.3f}" for n, v in zip(ens.member_names_, ens.weights_))
        say(args, f"\nweighted-average weights: {w}")
    if ens.selection_ is not None:
        say(args, f"best: {ens.selection_.name} (inner out-of-fold log loss "
                  + ", ".join(f"{k} {v:.4f}" for k, v in ens.selection_.scores.items()) + ")")  # fmt: skip
    say(
        args,
        f"kept method: {ens.method_}\nensemble written to {path} "
        f"({time.perf_counter() - t0:.1f} s); table: {os.path.join(path, 'comparison.json')}",
    )
    return 0
