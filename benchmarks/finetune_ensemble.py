"""Fine-tuned members vs feature stack vs ensembles on flowers5 (CPU).

Split: flowers5 (128x128 JPEGs, 5 classes), optionally the first ``--per-class`` images of each
class (sorted file names), then one stratified 80/20 split (sklearn StratifiedShuffleSplit,
``random_state=--seed``, default 0). Everything trains on the 80% only:

* ``ft-lite0``, ``ft-lite1``: FineTunedClassifier at the images' native 128 px, head epochs then
  fine-tuning epochs with the top blocks unfrozen, light augmentation, flip TTA; early stopping on
  a 15% hold-out of the 80%.
* ``stack``: StackedClassifier lite0+lite1+lite2 (logreg, 5 folds, flip TTA, calibrated).

Then every member alone and every ensemble method are scored on the same 20%. The ensemble
combiners (weighted, stacked) are fitted and scored by 5-fold cross-fitting **on that 20%**
(out-of-fold predictions: no image is scored by a combiner that saw it); ``mean`` fits nothing.
Members never saw the 20%.

    PYTHONPATH=src .venv/bin/python benchmarks/finetune_ensemble.py --per-class 300
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

import numpy as np

from _common import cpu_description as machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOWERS = os.path.join(os.path.dirname(ROOT), "shared", "data", "flowers5")


def md_table(rows, cols) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    from sklearn.model_selection import StratifiedShuffleSplit

    from stackvision import Runtime, StackedClassifier
    from stackvision.data import from_folder
    from stackvision.ensemble import EnsembleClassifier
    from stackvision.finetune import FineTunedClassifier

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=0, help="first N images per class (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--head-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--unfreeze", default="3")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--augment", default="light")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", default="/tmp/stackvision-bench-ftens")
    ap.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "finetune_ensemble.md")
    )
    args = ap.parse_args()
    t_all = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)
    cache = os.path.join(args.work, "cache")

    listing = from_folder(FLOWERS)
    seen: dict[str, int] = {}
    paths, labels = [], []
    for p, lab in zip(listing.paths, listing.labels):
        if not args.per_class or seen.get(lab, 0) < args.per_class:
            seen[lab] = seen.get(lab, 0) + 1
            paths.append(p)
            labels.append(lab)
    y = np.asarray(labels)
    sss = StratifiedShuffleSplit(n_splits=1, test_size=0.2, random_state=args.seed)
    tr, te = next(sss.split(np.zeros(len(y)), y))
    trp, trl = [paths[i] for i in tr], [labels[i] for i in tr]
    tep, tel = [paths[i] for i in te], [labels[i] for i in te]
    print(f"{len(trp)} train / {len(tep)} test images", flush=True)

    timings = {}
    members = {}
    unfreeze = args.unfreeze if args.unfreeze == "all" else int(args.unfreeze)
    for bb in ("lite0", "lite1"):
        name = f"ft-{bb}"
        out = os.path.join(args.work, name)
        t0 = time.perf_counter()
        m = FineTunedClassifier(
            bb,
            head_epochs=args.head_epochs,
            epochs=args.epochs,
            unfreeze=unfreeze,
            input_size=args.input_size,
            augment=args.augment,
            batch_size=args.batch_size,
            work_dir=out + ".work",
            seed=args.seed,
            runtime=Runtime(device="cpu", progress=True),
        )
        m.fit(trp, trl)
        m.save(out)
        timings[name] = round(time.perf_counter() - t0, 1)
        members[name] = out
        print(f"{name}: {timings[name]} s, best epoch {m.best_epoch_}", flush=True)

    t0 = time.perf_counter()
    stack = StackedClassifier(
        ["lite0", "lite1", "lite2"], folds=5, tta="flip", runtime=Runtime(cache, device="cpu")
    )
    stack.fit(trp, trl)
    stack.save(os.path.join(args.work, "stack"))
    timings["stack"] = round(time.perf_counter() - t0, 1)
    members["stack"] = os.path.join(args.work, "stack")
    print(f"stack: {timings['stack']} s", flush=True)

    results = {}
    for label, names in (
        ("fine-tuned pair", ["ft-lite0", "ft-lite1"]),
        ("fine-tuned pair + stack", ["ft-lite0", "ft-lite1", "stack"]),
    ):
        t0 = time.perf_counter()
        ens = EnsembleClassifier(
            [members[n] for n in names],
            method="all",
            folds=5,
            seed=args.seed,
            runtime=Runtime(cache, device="cpu"),
        )
        ens.fit(tep, tel)
        ens.save(os.path.join(args.work, "ens-" + "-".join(names)))
        timings[f"ensemble ({label})"] = round(time.perf_counter() - t0, 1)
        results[label] = {
            "table": ens.table_,
            "weights": dict(zip(ens.member_names_, map(float, ens.weights_))),
            "kept": ens.method_,
        }
        print(label, json.dumps(results[label], indent=1), flush=True)

    total = round(time.perf_counter() - t_all, 1)
    cmd = "PYTHONPATH=src .venv/bin/python benchmarks/finetune_ensemble.py " + " ".join(
        sys.argv[1:]
    )
    lines = [
        "## Fine-tuned models and ensembles (flowers5, CPU)",
        "",
        f"- Date: {dt.date.today().isoformat()}; machine: {machine()}, no GPU "
        "(shared with other jobs, so times are pessimistic).",
        f"- Command: `{cmd}`; total wall time {total} s.",
        f"- Data: flowers5 ({'first ' + str(args.per_class) + ' images per class, ' if args.per_class else ''}"
        f"{len(paths)} images), stratified 80/20 split, StratifiedShuffleSplit random_state={args.seed}: "
        f"{len(trp)} train, {len(tep)} test.",
        f"- Fine-tuned members: {args.head_epochs} head epoch(s) + {args.epochs} fine-tuning epoch(s), "
        f"top {args.unfreeze} block(s) unfrozen, BN frozen, AdamW, augment '{args.augment}', "
        f"{args.input_size} px (the images' native size), batch {args.batch_size}, early stopping on "
        "15% of the train split, flip TTA, temperature-calibrated on that 15%.",
        "- Stack: StackedClassifier lite0+lite1+lite2, logreg, 5 folds, flip TTA, calibrated (train split).",
        "- All rows are scored on the same test images. Members and `mean`: directly. `weighted` and "
        "`stacked`: fitted and scored by 5-fold cross-fitting on the test split (out-of-fold), so no "
        "test image is scored by a combiner fitted on it; members never saw the test split.",
        "",
    ]
    for label, r in results.items():
        lines += [f"### {label}", ""]
        lines.append(md_table(r["table"], ["model", "kind", "scored", "accuracy", "log_loss"]))
        best_member = min(x["log_loss"] for x in r["table"] if x["kind"] != "ensemble")
        best_ens = min(x["log_loss"] for x in r["table"] if x["kind"] == "ensemble")
        w = ", ".join(f"{k} {v:.3f}" for k, v in r["weights"].items())
        lines += [
            "",
            f"Weighted-average weights (fitted on all test images, for the saved model): {w}. "
            f"Kept method: `{r['kept']}`. Best ensemble log loss {best_ens:.4f} vs best member "
            f"{best_member:.4f}: target (ensemble beats its best member) "
            + ("met." if best_ens < best_member else "NOT met."),
            "",
        ]
    lines += ["Wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()), ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump({"results": results, "timings": timings, "args": vars(args)}, fh, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
