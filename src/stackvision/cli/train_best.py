"""``stackvision train --preset best``: the command-line side of :mod:`stackvision.best_pipeline`
(checks, the "what each step bought" table, the protocol, ``steps.json``)."""

from __future__ import annotations

import html
import os
import time

from ..errors import StackvisionError
from . import options as opt
from .display import report_problems, say, table


def run_best(args, started: float) -> int:
    from ..atomic import write_json
    from ..best_pipeline import fit_best
    from ..compare import STEP_COLS, steps_table
    from ..presets import BEST_DEFAULT_LIMIT, format_duration
    from ..report import Section

    if args.folds < 2 or args.val or args.val_split:
        raise StackvisionError(
            "--preset best scores the stack out-of-fold and holds out its own 20% for the "
            "ensemble (no --folds 0, --val or --val-split)",
            "drop those options; evaluate on your own validation data afterwards with "
            "`stackvision evaluate MODEL VAL --out DIR`",
        )
    limit = args.time_limit or BEST_DEFAULT_LIMIT
    data = opt.listing(args)
    say(args, f"preset best on {len(data)} images, {len(set(data.labels))} classes, time limit "
              f"{format_duration(limit)}: stack {args.backbones}, then LP-FT members and a 'best' "
              "ensemble as time allows")  # fmt: skip
    result = fit_best(
        data.paths,
        data.labels,
        stack_params={
            "backbones": opt.backbone_list(args.backbones),
            "head": args.head,
            "head_params": dict(args.head_param or []) or None,
            "folds": args.folds,
            "tta": args.tta,
            "train_views": args.train_views,
            "pool": args.pool,
            "class_weight": args.class_weight,
            "calibrate": not args.no_calibrate,
        },
        time_limit=limit,
        runtime=opt.runtime(args),
        weights=dict(args.weights or []),
        seed=args.seed,
        say=lambda m: say(args, m),
        started=started,
    )
    model = result.model
    rows = steps_table([s.row() for s in result.steps])
    cols = [c for c in STEP_COLS if any(c in r for r in rows)]
    text = table(rows, cols, decimals={"seconds": 1})
    model.problems_ = data.problems + list(model.problems_)
    model.report_sections = [
        Section(
            "How this model was made (preset best)",
            f"<p>{html.escape(result.protocol)}</p><pre>{html.escape(text)}</pre>",
            id="x-preset-best",
        )
    ]
    path = model.save(args.out)
    elapsed = time.monotonic() - started
    write_json(
        os.path.join(path, "steps.json"),
        {"protocol": result.protocol, "time_limit_s": limit, "elapsed_s": round(elapsed, 1),
         "steps": rows},
    )  # fmt: skip
    report_problems(model.problems_, args)
    say(args, "\nwhat each step bought (gain_* against the stack on the same images):")
    say(args, text)
    say(args, "\n" + result.protocol)
    say(
        args,
        f"\n{model.kind} model written to {path} ({format_duration(elapsed)} of "
        f"{format_duration(limit)}); report: {os.path.join(path, 'report', 'report.html')}",
    )
    return 0
