"""``stackvision predict``: predict images or folders.

Predict classes for images and/or folders of images.
"""

from __future__ import annotations

import csv
import os
import sys

from .. import options as opt
from ..display import report_problems, say


def add_arguments(pr) -> None:
    opt.add_model(pr)
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
    opt.add_out(pr, "CSV", "write the CSV here (default: stdout)", required=False)
    opt.add_weights(pr)
    opt.add_runtime_options(pr)


def rows_for(pred, fmt: str, top_k: int) -> tuple[list[str], list[list[str]]]:
    """The CSV header and rows of a :class:`Predictions` in ``topk`` or ``kaggle`` format."""
    classes = pred.classes
    if fmt == "kaggle":
        header = ["id", *classes]
        rows = [
            [os.path.splitext(os.path.basename(p))[0], *(f"{v:.6f}" for v in row)]
            for p, row in zip(pred.paths, pred.proba)
        ]
        return header, rows
    k = min(top_k, len(classes))
    header = ["path", *[f"{w}_{i + 1}" for i in range(k) for w in ("class", "prob")]]
    rows = [
        [p, *[x for c, v in top for x in (c, f"{v:.6f}")]]
        for p, top in zip(pred.paths, pred.top_k(k))
    ]
    return header, rows


def run(args) -> int:
    from ...atomic import atomic_open
    from ...data import from_paths

    if args.out:
        opt.check_out(args, "csv", [args.model, *args.inputs])
    model = opt.load_model_for(args)
    data = from_paths(args.inputs)
    pred = model.predict_paths(data.paths)
    problems = data.problems + pred.problems
    args.stdout_is_data = not args.out
    report_problems(problems, args)
    header, rows = rows_for(pred, args.format, args.top_k)
    if args.out:
        # surrogateescape: a file name that is not valid UTF-8 is written back as the same bytes
        with atomic_open(
            args.out, "w", newline="", encoding="utf-8", errors="surrogateescape"
        ) as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
        say(
            args,
            f"{len(rows)} predictions written to {args.out}"
            + (f" ({len(problems)} file(s) left out)" if problems else ""),
        )
    else:
        w = csv.writer(sys.stdout)
        w.writerow(header)
        w.writerows(rows)
    return 0
