"""The data doctor on injected noise: label flips and near-duplicates (issue 15).

For one data set (cub86 or imagewoof): flip 5% of the training labels (fixed seed) and add 3%
near-duplicates (small crop + resize + JPEG re-encode of other images, a third of them copies of
*validation* images: leaks), written to a scratch folder (never the repository). Then:

* the doctor on the clean data first: what it flags there is pre-existing (real label noise, real
  duplicates), counted separately;
* the doctor on the noisy data: precision / recall of label-issue detection (against the flips)
  and of near-duplicate detection (against the injected copy-source pairs), and its time;
* accuracy and log loss on the clean validation set (less the images that were copied into
  train) of one logistic head trained on clean, noisy, and corrected data (doctor.csv's default
  actions, and other action policies side by side, with two ceilings: the flipped rows exactly,
  excluded or given their true label), and the recovered fractions; also on a validation set less
  the real (pre-existing) leaks;
* ``--group-duplicates``: the 5-fold out-of-fold accuracy with identical-bytes groups only and with
  near-duplicate groups, next to the validation accuracy (how optimistic CV is with copies).

Usage: python benchmarks/doctor.py cub86 --backbones lite0,lite1,lite2 --cache /work/bench/cache
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np
from PIL import Image

from _common import SHARED_DATA  # noqa: I001 - run as a script from benchmarks/
from stackvision.backbones import resolve
from stackvision.cache import FeatureCache
from stackvision.data import from_folder
from stackvision.doctor import diagnose
from stackvision.doctor_output import csv_rows
from stackvision.extract import extract
from stackvision.validation import fit_head, fit_stack_heads, predict_views


def make_copy(src: str, dst: str, rng: random.Random) -> None:
    im = Image.open(src).convert("RGB")
    w, h = im.size
    f = rng.uniform(0.0, 0.10)  # crop up to 10% of each side's length, off-centre
    dx, dy = int(w * f * rng.random()), int(h * f * rng.random())
    im = im.crop((dx, dy, w - int(w * f) + dx, h - int(h * f) + dy))
    s = rng.uniform(0.6, 0.95)
    im = im.resize((max(32, int(im.width * s)), max(32, int(im.height * s))), Image.BICUBIC)
    im.save(dst, "JPEG", quality=rng.randint(60, 90))


def pairs_of(groups: list[dict]) -> set[tuple[str, str]]:
    out = set()
    for g in groups:
        ps = sorted(g["paths"])
        out |= {(a, b) for i, a in enumerate(ps) for b in ps[i + 1 :]}
    return out


def scores(X, y, Xv, yv, n_classes, n_views):
    """Validation accuracy and log loss of one logistic head trained on all of (X, y)."""
    head = fit_head("logreg", None, X, y, n_classes, np.arange(len(y)), None, n_views)
    p = predict_views(head, Xv, n_views)
    return float((p.argmax(1) == yv).mean()), float(
        -np.log(np.clip(p[np.arange(len(yv)), yv], 1e-12, 1)).mean()
    )


def accuracy(X, y, Xv, yv, n_classes, n_views):
    return scores(X, y, Xv, yv, n_classes, n_views)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", choices=["cub86", "imagewoof"])
    ap.add_argument("--backbones", default="lite0,lite1,lite2")
    ap.add_argument("--cache", default="/work/bench/cache")
    ap.add_argument("--scratch", default="/work/bench/doctor")
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--dups", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--skip-cv", action="store_true", help="skip the --group-duplicates CV part")
    ap.add_argument(
        "--time-only", action="store_true", help="only time the doctor on the clean data"
    )
    a = ap.parse_args()
    if a.time_only:
        return time_only(a)
    root = os.path.join(SHARED_DATA, a.data)
    tr, va = from_folder(os.path.join(root, "train")), from_folder(os.path.join(root, "val"))
    classes = tr.classes
    ci = {c: i for i, c in enumerate(classes)}
    rng = random.Random(a.seed)

    # near-duplicates: 2/3 copies of other training images, 1/3 of validation images (leaks)
    n_dup = int(round(a.dups * len(tr)))
    n_leak = n_dup // 3
    srcs = [(p, lab, "train") for p, lab in zip(tr.paths, tr.labels)]
    vsrcs = [(p, lab, "val") for p, lab in zip(va.paths, va.labels)]
    picked = rng.sample(srcs, n_dup - n_leak) + rng.sample(vsrcs, n_leak)
    scratch = os.path.join(a.scratch, f"inject-{a.data}-s{a.seed}")
    copies = []
    for k, (src, lab, side) in enumerate(picked):
        os.makedirs(os.path.join(scratch, lab), exist_ok=True)
        dst = os.path.join(scratch, lab, f"dup{k:05d}.jpg")
        make_copy(src, dst, rng)  # deterministic: the same bytes on every run
        copies.append((dst, src, lab, side))

    specs = [resolve(b) for b in a.backbones.split(",")]
    views = ("orig", "flip")
    cache = FeatureCache(a.cache)
    t0 = time.perf_counter()
    F = extract(tr.paths + [c[0] for c in copies], specs, views=views, cache=cache)
    V = extract(va.paths, specs, views=views, cache=cache)
    t_extract = time.perf_counter() - t0
    assert len(F.paths) == len(tr) + len(copies) and len(V.paths) == len(va), "bad images?"
    X, Xv = F.stacked(), V.stacked()
    n = len(tr)
    y_true = np.asarray([ci[lab] for lab in tr.labels] + [ci[c[2]] for c in copies], np.int64)
    yv = np.asarray([ci[lab] for lab in va.labels], np.int64)
    hashes = list(F.hashes) + list(V.hashes)
    base = np.unique(np.asarray(hashes), return_inverse=True)[1]
    base_clean = np.unique(np.asarray(F.hashes[:n] + V.hashes), return_inverse=True)[1]

    # label flips on the original training rows
    nrng = np.random.default_rng(a.seed)
    flipped = nrng.choice(n, int(round(a.flip * n)), replace=False)
    y_noisy = y_true.copy()
    for i in flipped:
        y_noisy[i] = nrng.choice([c for c in range(len(classes)) if c != y_true[i]])

    # 1. the doctor on the clean data: pre-existing findings
    t0 = time.perf_counter()
    clean = diagnose(X[:n], y_true[:n], classes, F.paths[:n], n_views=2,
                     val=(Xv, V.paths, yv), base_groups=base_clean)  # fmt: skip
    t_clean = time.perf_counter() - t0
    pre_label = {x["path"] for x in clean.label_issues}
    pre_pairs = pairs_of(clean.groups)

    # 2. the doctor on the noisy data
    t0 = time.perf_counter()
    d = diagnose(X, y_noisy, classes, F.paths, n_views=2, val=(Xv, V.paths, yv), base_groups=base)
    t_noisy = time.perf_counter() - t0
    flips = {F.paths[i] for i in flipped}
    flagged = [x["path"] for x in d.label_issues]
    tp = sum(p in flips for p in flagged)
    flagged_new = [p for p in flagged if p not in pre_label or p in flips]
    label = {
        "injected": len(flips), "flagged": len(flagged), "true_positives": tp,
        "precision": tp / max(len(flagged), 1), "recall": tp / max(len(flips), 1),
        "flagged_on_clean_data": len(pre_label),
        "precision_less_preexisting": tp / max(len(flagged_new), 1),
    }  # fmt: skip
    # how good the suggested labels are (what relabelling would give), all and confident ones
    true_of = {F.paths[i]: classes[y_true[i]] for i in flipped}
    for name, sel in (("all", d.label_issues), ("top_prob_ge_0.5", [x for x in d.label_issues if x["top_prob"] >= 0.5])):  # fmt: skip
        hit = [x for x in sel if x["path"] in true_of]
        label["suggestions_" + name] = {
            "flagged": len(sel), "precision": len(hit) / max(len(sel), 1),
            "suggestion_is_true_label": sum(true_of[x["path"]] == x["suggested_label"] for x in hit) / max(len(hit), 1),
        }  # fmt: skip

    # near-duplicates: an injected pair is found when copy and source share a group
    group_of = {p: g["group"] for g in d.groups for p in g["paths"]}
    found = sum(c[0] in group_of and group_of.get(c[0]) == group_of.get(c[1]) for c in copies)
    source_of = {c[0]: c[1] for c in copies}
    clean_group = {p: g["group"] for g in clean.groups for p in g["paths"]}
    predicted = pairs_of(d.groups) - pre_pairs

    def correct(pair):
        a_, b_ = pair
        for cp, other in ((a_, b_), (b_, a_)):
            if cp in source_of:
                s = source_of[cp]
                if other == s or (s in clean_group and clean_group.get(other) == clean_group[s]):
                    return True
                if other in source_of and source_of[other] == s:
                    return True
        return False

    good = sum(correct(p) for p in predicted)
    leaks_injected = sum(c[3] == "val" for c in copies)
    leaks_found = sum(
        c[3] == "val" and group_of.get(c[0]) is not None and group_of.get(c[0]) == group_of.get(c[1])
        for c in copies
    )  # fmt: skip
    dup = {
        "injected_pairs": len(copies), "found": found, "recall": found / max(len(copies), 1),
        "predicted_pairs_less_preexisting": len(predicted), "correct": good,
        "precision": good / max(len(predicted), 1), "preexisting_pairs": len(pre_pairs),
        "injected_leaks": leaks_injected, "leaks_found": leaks_found,
        "leak_groups_reported": len(d.leaks), "leak_groups_on_clean_data": len(clean.leaks),
    }  # fmt: skip

    # 3. accuracy on the clean validation set, less the images copied into train
    copied_val = {c[1] for c in copies if c[3] == "val"}
    keep_v = np.asarray([p not in copied_val for p in V.paths])
    Xv2, yv2 = Xv[keep_v], yv[keep_v]
    # the library's default actions (doctor.csv as written): exclude rows, relabel rows
    rows = [r for r in csv_rows(d) if r["split"] == "train"]
    excl = {r["path"] for r in rows if r["action"] == "exclude"}
    relab = {r["path"]: ci[r["suggested_label"]] for r in rows if r["action"] == "relabel"}
    keep = np.asarray([p not in excl for p in F.paths])
    y_def = np.asarray([relab.get(p, c) for p, c in zip(F.paths, y_noisy)], np.int64)
    acc_clean, ll_clean = scores(X[:n], y_true[:n], Xv2, yv2, len(classes), 2)
    acc_noisy, ll_noisy = scores(X, y_noisy, Xv2, yv2, len(classes), 2)
    acc_fixed = accuracy(X[keep], y_def[keep], Xv2, yv2, len(classes), 2)
    lost = acc_clean - acc_noisy
    # action policies side by side (independent of the library's current defaults)
    leak_tr = {p for g in d.leaks for p, s in zip(g["paths"], g["splits"]) if s == "train"}
    extra = {p for g in d.groups if not g["leak"] for k, (p, s) in
             enumerate(zip(g["paths"], g["splits"])) if k > 0 and s == "train"}  # fmt: skip
    lab_all = {x["path"] for x in d.label_issues}
    conf = {x["path"] for x in d.label_issues if x["top_prob"] >= 0.5}

    # the same, on a validation set without the real leaks either: the validation images whose
    # photograph is also in train (leak groups the doctor finds on the clean data) are scored by
    # their training copy, which the doctor's default excludes; the gains and losses there measure
    # the leak, not the labels
    real_leak_val = {p for g in clean.leaks for p, s in zip(g["paths"], g["splits"]) if s == "val"}
    keep_v3 = keep_v & np.asarray([p not in real_leak_val for p in V.paths])
    Xv3, yv3 = Xv[keep_v3], yv[keep_v3]
    acc_clean3 = accuracy(X[:n], y_true[:n], Xv3, yv3, len(classes), 2)
    acc_noisy3 = accuracy(X, y_noisy, Xv3, yv3, len(classes), 2)
    lost3 = acc_clean3 - acc_noisy3

    def policy(excl_set, relabel_set, to=None):
        to = sugg if to is None else to  # new label per relabelled path
        kp = np.asarray([p not in excl_set or p in relabel_set for p in F.paths])
        yy = np.asarray([to[p] if p in relabel_set else c for p, c in zip(F.paths, y_noisy)])
        head = fit_head("logreg", None, X[kp], yy[kp], len(classes), np.arange(int(kp.sum())),
                        None, 2)  # fmt: skip
        pv = predict_views(head, Xv2, 2)
        a_ = float((pv.argmax(1) == yv2).mean())
        ll = float(-np.log(np.clip(pv[np.arange(len(yv2)), yv2], 1e-12, 1)).mean())
        a3 = float((predict_views(head, Xv3, 2).argmax(1) == yv3).mean())
        return {"accuracy": a_, "excluded": int((~kp).sum()), "relabelled": len(relabel_set),
                "recovered_fraction": (a_ - acc_noisy) / lost if lost > 0 else None,
                "log_loss": ll, "recovered_fraction_log_loss": (ll_noisy - ll) / (ll_noisy - ll_clean)
                if ll_noisy > ll_clean else None,
                "accuracy_val_less_real_leaks": a3,
                "recovered_fraction_val_less_real_leaks": (a3 - acc_noisy3) / lost3
                if lost3 > 0 else None}  # fmt: skip

    sugg = {x["path"]: ci[x["suggested_label"]] for x in d.label_issues}
    policies = {
        "v1_exclude_labels_leaks_extra_copies": policy(lab_all | leak_tr | extra, set()),
        "exclude_labels_leaks_keep_copies": policy(lab_all | leak_tr, set()),
        "relabel_labels_exclude_leaks_keep_copies": policy(lab_all | leak_tr, lab_all),
        "relabel_confident_exclude_rest_keep_copies": policy(lab_all | leak_tr, conf),
        "exclude_confident_only_keep_copies": policy(conf | leak_tr, set()),
        # ceilings: a perfect detector (the flipped rows exactly), excluded or given their true label
        "oracle_exclude_flips_leaks": policy(flips | leak_tr, set()),
        "oracle_relabel_flips_exclude_leaks": policy(
            flips | leak_tr, flips, {F.paths[i]: int(y_true[i]) for i in flipped}
        ),
    }
    acc = {
        "policies": policies,
        "val_less_real_leaks": {"val_images": int(keep_v3.sum()), "clean": acc_clean3,
                                "noisy": acc_noisy3},
        "val_images": int(keep_v.sum()), "clean": acc_clean, "noisy": acc_noisy,
        "clean_log_loss": ll_clean, "noisy_log_loss": ll_noisy,
        "after_doctor": acc_fixed, "excluded": len(excl), "relabelled": len(relab),
        "recovered_fraction": (acc_fixed - acc_noisy) / lost if lost > 0 else None,
    }  # fmt: skip

    # 4. --group-duplicates: CV optimism with copies in the training data (true labels)
    cv = {}
    for name, groups in [] if a.skip_cv else (("identical_bytes", base[: len(F.paths)]), ("near_duplicates", d.train_groups)):  # fmt: skip
        t1 = time.perf_counter()
        r = fit_stack_heads("logreg", None, X, y_true, classes, folds=5, val_split=None,
                            val=(Xv2, yv2), n_views=2, class_weight=None, calibrate=True, seed=0,
                            groups=np.unique(groups, return_inverse=True)[1])  # fmt: skip
        cv[name] = {"cv_accuracy": r.metrics["accuracy"], "cv_log_loss": r.metrics["log_loss"],
                    "val_accuracy": r.metrics["holdout"]["accuracy"],
                    "val_log_loss": r.metrics["holdout"]["log_loss"],
                    "seconds": round(time.perf_counter() - t1, 1)}  # fmt: skip

    out = {
        "data": a.data, "backbones": a.backbones, "n_train": len(F.paths), "n_val": len(V.paths),
        "seconds": {"extract_or_cache": round(t_extract, 1), "doctor_clean": round(t_clean, 1),
                    "doctor_noisy": round(t_noisy, 1), "doctor_stats": d.stats},
        "label": label, "duplicates": dup, "accuracy": acc, "group_duplicates": cv,
        "clean_data_findings": clean.summary(),
    }  # fmt: skip
    print(json.dumps(out, indent=1, default=float))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)


def time_only(a) -> None:
    """Wall and CPU seconds of the doctor (features in memory, as in the verb after extraction)."""
    root = os.path.join(SHARED_DATA, a.data)
    tr, va = from_folder(os.path.join(root, "train")), from_folder(os.path.join(root, "val"))
    classes = tr.classes
    specs = [resolve(b) for b in a.backbones.split(",")]
    cache = FeatureCache(a.cache)
    F = extract(tr.paths, specs, views=("orig", "flip"), cache=cache)
    V = extract(va.paths, specs, views=("orig", "flip"), cache=cache)
    y = np.asarray([classes.index(lab) for lab in tr.labels])
    base = np.unique(np.asarray(F.hashes + V.hashes), return_inverse=True)[1]
    w0, c0 = time.perf_counter(), time.process_time()
    d = diagnose(
        F.stacked(), y, classes, F.paths, val=(V.stacked(), V.paths, None), base_groups=base
    )
    out = {"data": a.data, "backbones": a.backbones, "rows": len(F.paths) + len(V.paths),
           "wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(time.process_time() - c0, 1),
           "stats": d.stats, "load_avg": os.getloadavg()}  # fmt: skip
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
