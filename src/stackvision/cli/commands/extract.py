"""``stackvision extract``: fill the feature cache ahead of training.

Compute and cache backbone features for a data set (nothing cached is recomputed).
"""

from __future__ import annotations

import time

from .. import options as opt
from ..display import report_problems, table


def add_arguments(e) -> None:
    e.add_argument(
        "data", nargs="?", metavar="DATA", help="folder of class subfolders, images or a CSV"
    )
    opt.add_labels_csv(e)
    opt.add_backbone_options(e)
    opt.add_tta(e, "also cache horizontally flipped views")
    e.add_argument(
        "--export-shards",
        metavar="DIR",
        help="also write the features as .npy shards + index.json (for data larger than memory;"
        " train on them with train --from-shards DIR)",
    )
    e.add_argument(
        "--shard-rows",
        type=int,
        default=65536,
        metavar="N",
        help="images per shard for --export-shards (default: 65536)",
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --export-shards folder that stackvision wrote",
    )
    opt.add_runtime_options(e)


def run(args) -> int:
    from ...backbones import resolve
    from ...cache import FeatureCache, default_cache_dir
    from ...outputs import check_out
    from ...runners import extract_features

    rt = opt.runtime(args)
    if args.export_shards:
        check_out(
            args.export_shards,
            "shards",
            overwrite=args.overwrite,
            inputs=[args.data, args.labels, args.images],
            cache_dir=args.cache or default_cache_dir(),
            flag="--export-shards",
        )
    data = opt.labelled_or_images(args)
    weights = dict(args.weights or [])
    specs = [resolve(b, weights, args.pool) for b in opt.backbone_list(args.backbones)]
    views = ("orig", "flip") if args.tta == "flip" else ("orig",)
    precision = rt.precision or "fp32"
    cache = FeatureCache(rt.cache_dir)
    t0 = time.perf_counter()
    feats = extract_features(
        data.paths,
        specs,
        runner=rt.runner,
        ray_address=rt.ray_address,
        ray_actors=rt.ray_actors,
        views=views,
        pool=args.pool,
        cache=cache,
        engine=rt.engine,
        precision=precision,
        device=rt.device,
        batch_size=rt.batch_size,
        workers=rt.workers,
        decoder=rt.decoder,
        strict=rt.strict,
        progress=rt.progress,
        assemble=False,  # the features stay in the cache (and in --export-shards)
    )
    st = feats.stats
    report_problems(data.problems + feats.problems, args)
    row = {
        "images": st["n_images"],
        "used": st["n_used"],
        "bad": st["n_bad"],
        "cached": st["n_cached"],
        "computed": st["n_computed"],
        "img/s": st["images_per_second"],
        # one image = one pass per backbone and view: compare this with a one-view loop
        "passes/s": round(st["images_per_second"] * len(specs) * len(views), 1)
        if st["images_per_second"]
        else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(table([row], list(row)))
    print(f"cache: {cache.root}")
    if args.export_shards:
        _export_shards(args, data, feats, specs, views, cache, rt.engine, precision)
    return 0


def _export_shards(args, data, feats, specs, views, cache, engine, precision) -> None:
    from ...atomic import atomic_dir
    from ...engines import numbers_id
    from ...shards import export_shards

    labels = [data.labels[i] for i in feats.index] if data.labels else None
    with atomic_dir(args.export_shards) as tmp:  # an old shard set stays whole until this one is
        index = export_shards(
            tmp,
            feats.hashes,
            specs,
            views=views,
            pool=args.pool,
            cache=cache,
            numbers=numbers_id(engine, precision),
            pixels=feats.stats.get("pixels", "pil"),
            labels=labels,
            classes=data.classes if labels else None,
            rows_per_shard=args.shard_rows,
        )
    print(
        f"shards: {args.export_shards} ({index['n_rows']} rows x {len(views)} view(s) x "
        f"{index['dim']} dims in {len(index['shards'])} shard(s))"
    )
