"""``stackvision export``: export a model to ONNX.

Export a model to one self-contained ONNX file: uint8 RGB images (N, S, S, 3) -> class
probabilities, backbones, heads, fold averaging, flip TTA and calibration inside; class names
and the input contract in its metadata.
"""

from __future__ import annotations

import time

from .. import options as opt


def add_arguments(ex) -> None:
    from ...export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    opt.add_model(ex)
    ex.add_argument("--format", default="onnx", choices=["onnx"], help="(default: onnx)")
    opt.add_out(ex, "FILE", "file to write, e.g. model.onnx")
    ex.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: {DEFAULT_OPSET})",
    )
    ex.add_argument(
        "--no-check",
        action="store_true",
        help="skip running the file in ONNX Runtime against the torch model",
    )
    opt.add_weights(ex)
    # export builds the torch graph on the CPU, whatever the machine has
    ex.set_defaults(device="cpu", engine="torch", precision="fp32", quiet=True)


def check(args) -> None:
    """The opset range is checked before the model is loaded."""
    from ...export import OPSET_CONSTRAINT
    from ...params import InvalidParameter, validate_params

    try:
        validate_params({"opset": OPSET_CONSTRAINT}, {"opset": args.opset})
    except InvalidParameter as exc:
        raise exc.flag("--opset") from None


def run(args) -> int:
    from ...export import export_model

    check(args)
    opt.check_out(args, "onnx", [args.model])
    model = opt.load_model_for(args)
    t0 = time.perf_counter()
    info = export_model(model, args.out, args.format, opset=args.opset, check=not args.no_check)
    inp = info["input"]
    print(
        f"wrote {info['path']} ({info['bytes'] / 1e6:.1f} MB, opset {info['opset']}, "
        f"{info['n_classes']} classes) in {time.perf_counter() - t0:.1f} s"
    )
    print(f"input 'image': uint8 (N, {inp['size']}, {inp['size']}, 3) RGB; {inp['recipe']}")
    print(
        "output 'probabilities': float32 (N, n_classes); class names in metadata stackvision.classes"
    )
    if "max_abs_diff" in info:
        print(f"check: ONNX Runtime vs torch, max |diff| {info['max_abs_diff']:.1e}")
    return 0
