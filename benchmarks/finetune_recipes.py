"""What each fine-tuning recipe buys and costs on a CPU: LP-FT, unfreezing, layer-wise lr decay,
EMA, mixup, augmentation, against the linear probe and the feature stack.

Data: a class-folder set (default flowers5). Split, fixed and seeded by file order: for each
class (sorted file names) the first ``--train`` images train, the next ``--test`` are the test
set (never seen by any fit). Every fine-tuned run: lite0 at ``--input-size`` px, batch 32,
seed 0, early stopping on a stratified 15% of the training images, flip TTA, temperature on that
15%. ``probe`` is LP-FT with 0 epochs (the logistic regression on the frozen features at the
same input size). ``stack lite0 (train)`` is what ``stackvision train --backbones lite0`` makes
(224 px, 5 folds, flip). Scores: accuracy and log loss on the test images; seconds: the whole
fit (decode, features, epochs, calibration), wall clock, in-process.

    PYTHONPATH=src .venv/bin/python benchmarks/finetune_recipes.py --train 60 --test 100 \
        --configs probe,old,lpft2,lpft_all,lpft_all_decay,lpft_all_ema,lpft_all_mixup,lpft_all_aug
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _common import SHARED_DATA, cpu_description, md_table, today

BASE = {"epochs": 5, "batch_size": 32, "seed": 0}
LPFT = {**BASE, "head_init": "lp", "finetune_lr": 1e-4}
CONFIGS = {
    "probe": {**LPFT, "epochs": 0},
    "old": {**BASE, "head_epochs": 3, "unfreeze": 2},
    "lpft2": {**LPFT, "unfreeze": 2},
    "lpft_all": {**LPFT, "unfreeze": "all"},
    "lpft_all_decay": {**LPFT, "unfreeze": "all", "lr_decay": 0.7},
    "lpft2_lr3e-4": {**LPFT, "unfreeze": 2, "finetune_lr": 3e-4},
    "lpft2_ema": {**LPFT, "unfreeze": 2, "ema": 0.99},
    "lpft2_mixup": {**LPFT, "unfreeze": 2, "mixup": 0.2},
    "lpft2_aug": {**LPFT, "unfreeze": 2, "augment": "standard"},
}


def split(root: str, n_train: int, n_test: int, classes: int):
    tr, te = ([], []), ([], [])
    for c in sorted(os.listdir(root))[: classes or None]:
        files = sorted(os.listdir(os.path.join(root, c)))
        for f in files[:n_train]:
            tr[0].append(os.path.join(root, c, f))
            tr[1].append(c)
        for f in files[n_train : n_train + n_test]:
            te[0].append(os.path.join(root, c, f))
            te[1].append(c)
    return tr, te


def main() -> int:
    from stackvision import Runtime, StackedClassifier
    from stackvision.finetune import FineTunedClassifier
    from stackvision.metrics import classification_metrics

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(SHARED_DATA, "flowers5"))
    ap.add_argument("--classes", type=int, default=0, help="first N classes (0: all)")
    ap.add_argument("--train", type=int, default=60)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--stack", action="store_true", help="add the lite0 feature-stack row")
    ap.add_argument("--cache", default="/work/bench/lpft/cache")
    ap.add_argument("--out", default="/work/bench/lpft/finetune_recipes.json")
    args = ap.parse_args()
    (X, y), (tX, ty) = split(args.data, args.train, args.test, args.classes)
    rt = Runtime(device="cpu", cache_dir=args.cache, progress=False)
    rows = []
    if os.path.exists(args.out):
        with open(args.out) as fh:
            rows = json.load(fh)
    done = {r["config"] for r in rows}

    def record(name, model, secs, extra=""):
        proba = model.predict_proba(tX)
        m = classification_metrics([model.classes_.index(c) for c in ty], proba, model.classes_)
        rows.append({
            "config": name, "settings": extra, "test_accuracy": 100 * m["accuracy"],
            "test_log_loss": m["log_loss"], "fit_seconds": round(secs, 1),
            "epochs_run": len(getattr(model, "history_", []) or []),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)

    if args.stack and "stack lite0 (train)" not in done:
        t0 = time.perf_counter()
        model = StackedClassifier(["lite0"], folds=5, tta="flip", runtime=rt).fit(X, y)
        record("stack lite0 (train)", model, time.perf_counter() - t0, "224 px, 5 folds, flip")
    for name in args.configs.split(","):
        if name in done:
            continue
        cfg = CONFIGS[name]
        t0 = time.perf_counter()
        model = FineTunedClassifier("lite0", input_size=args.input_size, runtime=rt, **cfg)
        model.fit(X, y)
        shown = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("batch_size", "seed"))
        record(name, model, time.perf_counter() - t0, shown)
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    cols = ["config", "settings", "test_accuracy", "test_log_loss", "fit_seconds", "epochs_run"]
    print(f"\n{cpu_description()}; load average {load}; {today()}; {' '.join(sys.argv)}")
    print(md_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
