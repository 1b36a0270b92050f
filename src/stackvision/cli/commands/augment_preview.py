"""``stackvision augment-preview``: a PNG grid of training augmentations.

Write a grid: a few images of DATA, each original followed by augmented copies.
"""

from __future__ import annotations

from .. import options as opt
from ..display import report_problems


def add_arguments(a) -> None:
    opt.add_labelled_data(a, required=False)
    opt.add_out(a, "PNG", "image file to write")
    a.add_argument(
        "--augment", default="standard", metavar="PRESET[,k=v]", help="(default: standard)"
    )
    a.add_argument("--backbone", default="lite0", help="whose input size/crop to use")
    a.add_argument("--input-size", type=int, help="override the backbone's input size")
    a.add_argument("--rows", type=int, default=4, help="images shown, one per row (default: 4)")
    a.add_argument("--per-image", type=int, default=6, help="augmented copies per row")
    a.add_argument(
        "--seed", type=int, default=0, help="seed for the images shown and their augmentations"
    )
    a.add_argument("-q", "--quiet", action="store_true", help="print only the result line")


def run(args) -> int:
    import random
    from dataclasses import replace

    from ...augment import Augment, preview_grid
    from ...backbones import resolve

    opt.check_out(args, "png", opt.data_inputs(args))
    data = opt.labelled_or_images(args)
    aug = Augment.parse(args.augment or "standard")
    pp = resolve(args.backbone).preprocess
    if args.input_size:
        pp = replace(pp, input_size=args.input_size)
    paths = list(data.paths)
    random.Random(args.seed).shuffle(paths)
    out, problems = preview_grid(
        paths[: args.rows], args.out, aug, pp, per_image=args.per_image, seed=args.seed
    )
    report_problems(problems, args)
    print(f"preview of {min(args.rows, len(paths))} image(s) x {args.per_image} written to {out}")
    return 0
