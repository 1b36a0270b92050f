"""The logreg head with and without its shrinkage-LDA component (issue 12, the head).

Every row trains the default stack (fine-grained, flip TTA, 5 folds) on the same features and
splits twice, side by side: ``head_params={"lda": 0}`` (plain logistic regression, the head
before) and the default (the LDA weight chosen by inner CV, ``head_select.choose_lda``), and
scores both on the same held-out images:

* ``cub86``: train on ``cub86/train``, score on ``cub86/val``;
* ``flowers5``: the stratified 70/30 split of ``accuracy_features.py`` (seed 0);
* ``imagewoof``: train on ``imagewoof/train``, score on ``imagewoof/val``.

Fit times are in-loop (features from the cache; fill it first with ``stackvision extract``).

    PYTHONPATH=src .venv/bin/python benchmarks/lda_head.py --cache /work/bench/cache
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_flags, machine, md_table, today, write_results  # noqa: E402
from accuracy_features import datasets, fit_and_score  # noqa: E402
from stackvision import Runtime, StackedClassifier  # noqa: E402


def fit_score(data, cache, head_params):
    model = StackedClassifier(head_params=head_params, runtime=Runtime(cache_dir=cache))
    m, t_fit, n_test = fit_and_score(model, data)
    lda = (model.metrics_ or {}).get("lda") or {}
    return {
        "accuracy": m["accuracy"],
        "log_loss": m["log_loss"],
        "fit_s": t_fit,
        "weight": model.head_params_.get("lda", 0.0),
        "choice_s": lda.get("seconds", 0.0),
        "n_test": n_test,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--data", nargs="+", default=["cub86", "flowers5", "imagewoof"])
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "lda_head.md"))
    args = ap.parse_args()
    sets = datasets(args.data)
    rows = []
    for name, data in sets.items():
        before = fit_score(data, args.cache, {"lda": 0.0})
        after = fit_score(data, args.cache, None)
        rows.append({
            "data": name,
            "test images": before["n_test"],
            "logreg acc": f"{before['accuracy']:.4f}",
            "logreg log loss": f"{before['log_loss']:.4f}",
            "+ LDA acc": f"{after['accuracy']:.4f}",
            "+ LDA log loss": f"{after['log_loss']:.4f}",
            "Δacc (points)": f"{100 * (after['accuracy'] - before['accuracy']):+.2f}",
            "LDA weight": f"{after['weight']:.3g}",
            "fit s (logreg / + LDA, of which choice)":
                f"{before['fit_s']:.0f} / {after['fit_s']:.0f} ({after['choice_s']:.0f})",
        })  # fmt: skip
        print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    text = "\n".join([
        f"Machine: {machine()}; {cpu_flags()}. Date: {today()}. 1-min load average at the end: {load:.1f}.",
        f"Command: `python benchmarks/lda_head.py {' '.join(sys.argv[1:])}`",
        "",
        md_table(rows, list(rows[0])),
    ])  # fmt: skip
    write_results(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
