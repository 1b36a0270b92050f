"""The accuracy cost of torchvision's pixels (``--decoder torchvision``) against PIL's.

Same images, same backbone (lite0, one view), same 5-fold splits and head: a
``StackedClassifier`` trained once on features of PIL-decoded images (the default decoders) and
once on features of torchvision-decoded ones (``gpu_decode.py``; here on the CPU: libjpeg
instead of nvJPEG, the same resize code). Also the pixel and feature differences. The two
feature stores are kept apart by the cache key (``pixels: torchvision``).

    python benchmarks/decode_compare.py --pil-cache /work/bench/cache --per-class 30
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import SHARED_DATA, cpu_flags, today, write_results

REPO = Path(__file__).resolve().parents[1]
SETS = {"cub86": ("cub86", "train"), "imagewoof": ("imagewoof", "val")}


def listing(name: str, per_class: int) -> tuple[list[str], list[str]]:
    folder, split = SETS[name]
    root = Path(SHARED_DATA) / folder / split
    paths, labels = [], []
    for c in sorted(os.listdir(root)):
        files = sorted((root / c).iterdir())[:per_class]
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    return paths, labels


def main() -> int:
    sys.path.insert(0, str(REPO / "src"))
    from stackvision import Runtime, StackedClassifier
    from stackvision.decoding import DecodePool
    from stackvision.gpu_decode import TorchvisionPool

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="cub86,imagewoof")
    ap.add_argument("--per-class", type=int, default=30, help="images per class and set")
    ap.add_argument("--pil-cache", help="feature cache for the PIL run (may be warm)")
    ap.add_argument("--tv-cache", help="feature cache for the torchvision run (default: fresh)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decode_compare.md"))
    args = ap.parse_args()
    tv_cache = args.tv_cache or tempfile.mkdtemp(prefix="sv-tv-")
    pil_cache = args.pil_cache or tempfile.mkdtemp(prefix="sv-pil-")
    load0 = os.getloadavg()[0]
    rows = []
    for name in args.sets.split(","):
        paths, labels = listing(name, args.per_class)
        res = {}
        for decoder, cache in (("pil", pil_cache), ("torchvision", tv_cache)):
            rt = Runtime(cache_dir=cache, device="cpu", decoder=decoder)
            t = time.perf_counter()
            m = StackedClassifier(["lite0"], tta="none", folds=5, seed=0, runtime=rt)
            m.fit(paths, labels)
            res[decoder] = (m.metrics_, m._features_cache.stacked()[:, 0], time.perf_counter() - t)
            print(f"{name} {decoder}: acc {m.metrics_['accuracy']:.4f}", flush=True)
        # pixels: the lite0 crops of the first 64 images from both decoders
        from stackvision.backbones import resolve

        items = [
            (p, [("x", resolve("lite0").preprocess)]) for p in paths[:: max(1, len(paths) // 64)]
        ]
        with TorchvisionPool("cpu") as tv, DecodePool(2) as pil:
            a, b = next(tv.run([items])), next(pil.run([items]))
        px = np.mean([np.abs(x["x"].astype(int) - y["x"].astype(int)).mean() for x, y in zip(a, b)])
        fa, fb = res["pil"][1], res["torchvision"][1]
        cos = ((fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)).mean()
        mp, mt = res["pil"][0], res["torchvision"][0]
        rows.append(
            f"| {name} ({SETS[name][1]}, {len(paths)} images, {len(set(labels))} classes) | "
            f"{mp['accuracy']:.4f} | {mt['accuracy']:.4f} | "
            f"{100 * (mp['accuracy'] - mt['accuracy']):+.2f} | {mp['log_loss']:.4f} | "
            f"{mt['log_loss']:.4f} | {px:.2f} | {cos:.4f} |"
        )
    cmd = "python " + shlex.join(["benchmarks/decode_compare.py", *sys.argv[1:]])
    text = f"""## Accuracy cost of torchvision-decoded pixels (`--decoder torchvision`)

- Date: {today()}; machine: {cpu_flags()}; no GPU here, so torchvision decoded on the CPU
  (libjpeg; nvJPEG on a GPU decodes the same JPEG standard, its IDCT may differ by a level).
  1-min load average {load0:.1f} at start.
- Command: `{cmd}`
- lite0, one view, 5-fold logistic regression (same folds), cross-validated (out-of-fold) figures.
  "cost" = PIL accuracy - torchvision accuracy, in points. Pixel diff: mean absolute difference
  of the lite0 crops (0..255), ~64 images; cosine: mean cosine similarity of the two features.

| images | PIL acc | torchvision acc | cost (points) | PIL log loss | torchvision log loss | pixel diff | feature cosine |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}
"""
    write_results(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
