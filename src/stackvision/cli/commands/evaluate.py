"""``stackvision evaluate``: metrics and report on labelled data.

Evaluate a model on labelled data: metrics.json and report/ in --out.
"""

from __future__ import annotations

import os
import sys

from ...errors import StackvisionError
from .. import options as opt
from ..display import report_problems, table


def add_arguments(ev) -> None:
    opt.add_model(ev)
    opt.add_labelled_data(ev, required=False)
    opt.add_out(ev, "DIR", "folder for metrics.json and report/ (written whole, atomically)")
    opt.add_weights(ev)
    opt.add_runtime_options(ev)


def run(args) -> int:
    import numpy as np

    from ... import __version__
    from ...atomic import atomic_dir, write_json
    from ...metrics import classification_metrics, summary_row
    from ...model_dir import training_overlap
    from ...outputs import EVALUATION_FORMAT
    from ...report import write_report

    opt.check_out(args, "evaluation", [args.model, *opt.data_inputs(args)])
    model = opt.load_model_for(args)
    data = opt.listing(args)
    unknown = sorted(set(data.labels) - set(model.classes_))
    if unknown:
        raise StackvisionError(
            f"labels not known to the model: {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else ""),
            f"the model's classes are: {', '.join(model.classes_[:10])}"
            + (" ..." if len(model.classes_) > 10 else ""),
        )
    pred = model.predict_paths(data.paths)
    label_of = dict(zip(data.paths, data.labels))
    index = {c: i for i, c in enumerate(model.classes_)}
    y = np.asarray([index[label_of[p]] for p in pred.paths], np.int64)
    metrics = {
        "validation": f"evaluate on {data.source}",
        **classification_metrics(y, pred.proba, model.classes_),
    }
    problems = data.problems + pred.problems
    metrics["problems"] = [p.__dict__ for p in problems]
    seen = training_overlap(args.model, pred.paths)
    if seen:  # scored, but said: these are not held-out numbers
        metrics["training_overlap"] = {"n_images": seen, "of": len(pred.paths)}
        metrics["validation"] += f" ({seen} of {len(pred.paths)} images were training images)"
        print(f"warning: {seen} of the {len(pred.paths)} images were used to train this model: "
              "these scores are not held-out scores", file=sys.stderr)  # fmt: skip
    with atomic_dir(args.out) as tmp:
        write_json(os.path.join(tmp, "metrics.json"), metrics)
        write_report(
            os.path.join(tmp, "report"),
            metrics,
            pred.paths,
            y,
            pred.proba,
            model.classes_,
            problems=problems,
            title=f"stackvision evaluation: {os.path.basename(os.path.abspath(args.model))}",
        )
        # last: marks a complete evaluation folder, which a later --overwrite may replace
        write_json(
            os.path.join(tmp, "manifest.json"),
            {
                "format": EVALUATION_FORMAT,
                "format_version": 1,
                "stackvision_version": __version__,
                "model": os.path.abspath(args.model),
                "data": data.source,
            },
        )
    report_problems(problems, args)
    print(table([summary_row(metrics)], ["n_images", "accuracy", "top5_accuracy", "log_loss"]))
    print(
        f"metrics: {os.path.join(args.out, 'metrics.json')}; report: "
        f"{os.path.join(args.out, 'report', 'report.html')}"
    )
    return 0
