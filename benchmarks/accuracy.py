"""Accuracy benchmark: train on imagewoof/train, evaluate on imagewoof/val.

Rows: ``lite0`` alone (logreg, no TTA) and the default stack (lite0+lite1+lite2, 5 folds, flip TTA),
plus ablations computed from the same cached features. Extraction runs from a cold cache (a fresh
folder) so its images/s and wall time are real; a second fit of the default stack measures the
warm-cache training time. Results go to BENCHMARKS.md (section ``accuracy``) and
benchmarks/results/accuracy.json.

    .venv/bin/python benchmarks/accuracy.py            # full run (about an hour on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --per-class 40 --out /tmp/x.md   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SHARED_DATA, machine, md_table, today, write_section  # noqa: E402
from stackvision import Runtime, StackedClassifier  # noqa: E402
from stackvision.data import from_folder  # noqa: E402
from stackvision.metrics import classification_metrics  # noqa: E402


def subset(listing, per_class):
    if not per_class:
        return listing.paths, listing.labels
    seen, paths, labels = {}, [], []
    for p, lab in zip(listing.paths, listing.labels):
        if seen.get(lab, 0) < per_class:
            seen[lab] = seen.get(lab, 0) + 1
            paths.append(p)
            labels.append(lab)
    return paths, labels


def evaluate(model, paths, labels):
    t0 = time.perf_counter()
    pred = model.predict_paths(paths)
    index = {c: i for i, c in enumerate(model.classes_)}
    label_of = dict(zip(paths, labels))
    y = [index[label_of[p]] for p in pred.paths]
    import numpy as np

    m = classification_metrics(np.asarray(y), pred.proba, model.classes_)
    return m, time.perf_counter() - t0, pred.stats


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=os.path.join(SHARED_DATA, "imagewoof"))
    ap.add_argument(
        "--per-class", type=int, default=0, help="use only N images a class (quick runs)"
    )
    ap.add_argument(
        "--cache", help="feature cache (default: a fresh temp folder, i.e. a cold cache)"
    )
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", help="markdown file to write the section to (default: BENCHMARKS.md)")
    args = ap.parse_args(argv)

    cache = args.cache or tempfile.mkdtemp(prefix="sv-bench-cache-")
    train = from_folder(os.path.join(args.data, "train"))
    val = from_folder(os.path.join(args.data, "val"))
    Xtr, ytr = subset(train, args.per_class)
    Xva, yva = subset(val, args.per_class)
    print(f"train {len(Xtr)} images, val {len(Xva)} images, cache {cache}", flush=True)
    common = {"runtime": Runtime(cache_dir=cache, engine=args.engine, progress=True)}
    rows, details = [], {}

    configs = [
        ("lite0 alone, logreg, no TTA", ["lite0"], "none"),
        ("lite0+lite1+lite2 stack, flip TTA (default)", ["lite0", "lite1", "lite2"], "flip"),
    ]
    models = {}
    for label, backbones, tta in configs:
        t0 = time.perf_counter()
        model = StackedClassifier(backbones, folds=args.folds, tta=tta, **common).fit(Xtr, ytr)
        fit_s = time.perf_counter() - t0
        m, pred_s, pstats = evaluate(model, Xva, yva)
        st = model.extract_stats_
        models[label] = model
        rows.append(
            {
                "model": label,
                "folds": args.folds,
                "val accuracy": m["accuracy"],
                "val top-5": m["top5_accuracy"],
                "val log loss": m["log_loss"],
                "CV accuracy": model.metrics_["accuracy"],
                "CV log loss": model.metrics_["log_loss"],
                "train images computed": st["n_computed"],
                "extraction img/s": st["images_per_second"],
                "train wall s": round(fit_s, 1),
                "val wall s": round(pred_s, 1),
            }
        )
        details[label] = {
            "val": m,
            "cv": model.metrics_,
            "extract_train": st,
            "extract_val": pstats,
            "temperature": model.temperature_,
        }
        print(rows[-1], flush=True)

    # Warm cache: the same default-stack fit again (features all cached).
    t0 = time.perf_counter()
    StackedClassifier(["lite0", "lite1", "lite2"], folds=args.folds, tta="flip", **common).fit(
        Xtr, ytr
    )
    warm_s = time.perf_counter() - t0

    # Ablations from the cache: each backbone alone with flip TTA, the stack without TTA.
    ablations = []
    for label, backbones, tta in [
        ("lite0, flip TTA", ["lite0"], "flip"),
        ("lite1, flip TTA", ["lite1"], "flip"),
        ("lite2, flip TTA", ["lite2"], "flip"),
        ("stack, no TTA", ["lite0", "lite1", "lite2"], "none"),
    ]:
        model = StackedClassifier(backbones, folds=args.folds, tta=tta, **common).fit(Xtr, ytr)
        m, _, _ = evaluate(model, Xva, yva)
        ablations.append(
            {
                "model": label,
                "val accuracy": m["accuracy"],
                "val log loss": m["log_loss"],
                "CV log loss": model.metrics_["log_loss"],
            }
        )
        print(ablations[-1], flush=True)

    cmd = (
        "python benchmarks/accuracy.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    body = f"""## Accuracy on imagewoof (issue 2)

- Machine: {machine()}
- Date: {today()}
- Command: `{cmd}` (engine `{args.engine}`, {"feature cache given with --cache (warm if filled before; then extraction figures are blank)" if args.cache else "cold feature cache"})
- Data: `imagewoof/train` ({len(Xtr)} images) for training, `imagewoof/val` ({len(Xva)} images) for evaluation.
  Imagewoof images come from ImageNet, which the backbones were pretrained on: the figures flatter
  the backbones; use them to compare methods, not as a promise for your data.

{md_table(rows, ["model", "val accuracy", "val top-5", "val log loss", "CV accuracy", "CV log loss", "train images computed", "extraction img/s", "train wall s", "val wall s"])}

"extraction img/s" counts images through every backbone and view the model needs (the stack: 3 backbones x 2 views).
Default stack retrained from a warm cache (features all cached): **{warm_s:.1f} s**.

Ablations (same folds, features from the cache, evaluated on val):

{md_table(ablations, ["model", "val accuracy", "val log loss", "CV log loss"])}
"""
    write_section("accuracy", body, args.out)
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    with open(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "accuracy.json"), "w"
    ) as fh:
        json.dump(
            {"rows": rows, "ablations": ablations, "warm_fit_seconds": warm_s, "details": details},
            fh,
            indent=1,
            default=float,
        )
    print(body)
    if not args.cache:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
