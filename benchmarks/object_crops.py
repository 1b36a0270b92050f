"""Object crops as a second view (issue 12, measured, not adopted): does zooming in on the
object, located without training from the network's own activations, add to the stack?

The locator is SCDA (Wei et al. 2017, "Selective Convolutional Descriptor Aggregation"): lite0's
final feature map on the whole image (short side ``--short`` px, no crop), summed over channels;
the mask ``A > mean(A) + k * std(A)``; its largest connected component gives a box, widened by
``--margin`` and made square where the image allows. The crops are written as JPEG (quality 95)
under ``--work`` (outside the repository, mirroring the data's folders) and go through the normal
``StackedClassifier`` path, so their features are cached like any image's.

Every row scores on the same held-out images (cub86: train -> val; flowers5: the fixed 70/30
split of ``accuracy_features.py``): the stack on the whole images, the stack on the crops, and
their combinations (mean and geometric mean of the probabilities; ``calibrated``: weights and
temperatures fitted on the training images' out-of-fold rows).

    PYTHONPATH=src .venv/bin/python benchmarks/object_crops.py --cache /work/bench/cache
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SHARED_DATA, cpu_flags, machine, today, write_table  # noqa: E402
from accuracy_features import datasets  # noqa: E402
from stackvision import Runtime, StackedClassifier  # noqa: E402
from stackvision.ensemble_methods import as_array, combine_calibrated, fit_calibrated  # noqa: E402
from stackvision.metrics import classification_metrics  # noqa: E402


def locate(paths, k: float, margin: float, short: int) -> list[tuple[int, int, int, int]]:
    """SCDA boxes (left, top, right, bottom) in each image's own pixels."""
    import torch
    from PIL import Image
    from scipy import ndimage

    from stackvision.backbones import build_model, resolve

    spec = resolve("lite0")
    net = build_model(spec)
    mean = torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocess.std).view(1, 3, 1, 1)
    boxes = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
        w, h = im.size
        s = short / min(w, h)
        small = np.array(im.resize((max(32, round(w * s)), max(32, round(h * s))), Image.BICUBIC))
        x = torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            a = net.forward_features((x - mean) / std)[0].sum(0).numpy()
        mask = a > a.mean() + k * a.std()
        lab, n = ndimage.label(mask)
        if n == 0:
            boxes.append((0, 0, w, h))
            continue
        big = 1 + int(np.argmax(ndimage.sum(mask, lab, range(1, n + 1))))
        ys, xs = np.where(lab == big)
        fh, fw = a.shape
        x0, x1 = xs.min() / fw * w, (xs.max() + 1) / fw * w
        y0, y1 = ys.min() / fh * h, (ys.max() + 1) / fh * h
        side = max(x1 - x0, y1 - y0) * (1 + margin)
        bw, bh = min(side, w), min(side, h)
        left = min(max(0.0, (x0 + x1 - bw) / 2), w - bw)
        top = min(max(0.0, (y0 + y1 - bh) / 2), h - bh)
        boxes.append((round(left), round(top), round(left + bw), round(top + bh)))
    return boxes


def write_crops(paths, boxes, root: str, work: str) -> tuple[list[str], float]:
    """The crops' paths (``work``/path relative to ``root``) and their mean area fraction."""
    from PIL import Image

    out, areas = [], []
    for p, b in zip(paths, boxes):
        dst = os.path.join(work, os.path.relpath(p, root))
        if not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with Image.open(p) as im:
                im.convert("RGB").crop(b).save(dst, quality=95)
        with Image.open(p) as im:
            areas.append((b[2] - b[0]) * (b[3] - b[1]) / (im.size[0] * im.size[1]))
        out.append(dst)
    return out, float(np.mean(areas))


def fit_predict(stack, train, test, cache):
    """(test probabilities in ``test``'s order, out-of-fold rows in ``train``'s order, classes)."""
    (trp, trl), (tep, _) = train, test
    m = StackedClassifier(stack, runtime=Runtime(cache_dir=cache)).fit(trp, trl)
    pred = m.predict_paths(tep)
    if len(pred.paths) != len(tep):
        raise SystemExit("an image could not be read: the rows would not line up")
    at = {p: i for i, p in enumerate(pred.paths)}
    oof_at = {p: i for i, p in enumerate(m.train_paths_)}
    te = pred.proba[[at[p] for p in tep]]
    oof = m.oof_proba_[[oof_at[p] for p in trp]]
    return te, oof, list(m.classes_)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--data", nargs="+", default=["cub86", "flowers5"])
    ap.add_argument("--stack", default="fine-grained")
    ap.add_argument("--k", type=float, default=0.5, help="mask threshold: mean + k std")
    ap.add_argument("--margin", type=float, default=0.15)
    ap.add_argument("--short", type=int, default=320, help="locator's input short side")
    ap.add_argument("--work", default="/tmp/stackvision-object-crops")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "object_crops.md"))
    args = ap.parse_args()
    lines = [f"- Date: {today()}. Machine: {machine()}; CPU flags: {cpu_flags()}.",
             f"- Load average at start: {os.getloadavg()}.",
             f"- Stack `{args.stack}`; locator lite0, short side {args.short}, k {args.k}, "
             f"margin {args.margin}."]  # fmt: skip
    rows = []
    for name, (train, test) in datasets(args.data).items():
        root = os.path.join(SHARED_DATA, name)
        t0 = time.perf_counter()
        crops, area = {}, []
        for part in (train, test):
            boxes = locate(part[0], args.k, args.margin, args.short)
            paths, a = write_crops(part[0], boxes, root, os.path.join(args.work, name))
            crops.update(zip(part[0], paths))
            area.append(a)
        t_loc = time.perf_counter() - t0
        lines.append(f"- {name}: locating and writing {len(crops):,} crops {t_loc:.0f} s; mean "
                     f"crop area {np.mean(area):.0%} of the image.")  # fmt: skip
        full = fit_predict(args.stack, train, test, args.cache)
        crop = fit_predict(args.stack, *[([crops[p] for p in d[0]], d[1]) for d in (train, test)],
                           args.cache)  # fmt: skip
        index = {c: i for i, c in enumerate(full[2])}
        y_te = np.array([index[c] for c in test[1]])
        y_tr = np.array([index[c] for c in train[1]])
        pt, po = as_array([full[0], crop[0]]), as_array([full[1], crop[1]])
        geo = np.exp(np.log(np.clip(pt, 1e-12, 1)).mean(0))
        candidates = {
            "whole images": full[0],
            "object crops": crop[0],
            "both, mean": pt.mean(0),
            "both, geometric mean": geo / geo.sum(1, keepdims=True),
            "both, calibrated (fitted out-of-fold)": combine_calibrated(
                pt, fit_calibrated(po, y_tr)
            ),
        }
        for label, p in candidates.items():
            m = classification_metrics(y_te, p, full[2])
            rows.append({"data": name, "model": label, "test images": len(y_te),
                         "accuracy": f"{m['accuracy']:.4f}", "log loss": f"{m['log_loss']:.4f}"})  # fmt: skip
            print(rows[-1], flush=True)
    write_table(args.out, lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
