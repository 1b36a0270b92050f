"""Options shared by several verbs, defined once, and the checks every verb runs before any work."""

from __future__ import annotations

import argparse
import contextlib
import numbers
import os

from ..errors import StackvisionError
from ..params import Interval, InvalidParameter, validate_params
from ..runtime import Runtime

POS = Interval(numbers.Integral, 1, None)

#: Checks on values only the CLI has (argparse dest -> accepted values), run before any work.
#: Runtime options are checked by :class:`Runtime`, estimator parameters by the estimators'
#: own ``_parameter_constraints`` (the same tables the library uses), worded with the flags.
ARG_CONSTRAINTS = {
    "top_k": [POS],
    "shard_rows": [POS],
    "rows": [POS],
    "per_image": [POS],
    "port": [Interval(numbers.Integral, 0, 65535)],
    "max_batch": [POS],
    "max_images": [POS],
    "max_pixels": [POS],
    "max_upload_mb": [Interval(numbers.Real, 0, None, closed="neither")],
    "max_wait_ms": [Interval(numbers.Real, 0, None)],
    "max_image_mb": [Interval(numbers.Real, 0, None, closed="neither"), None],
    "input_size": [Interval(numbers.Integral, 32, 2048), None],
}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def reword(exc: InvalidParameter, flags: dict[str, str] | None = None) -> StackvisionError:
    """An estimator's parameter error in command-line words (``folds`` -> ``--folds``)."""
    return exc.flag((flags or {}).get(exc.name, flag_of(exc.name)))


def check_args(args: argparse.Namespace) -> None:
    """Refuse nonsense values before any work: one line, exit 2."""
    try:
        validate_params(ARG_CONSTRAINTS, vars(args))
        if hasattr(args, "batch_size"):  # a verb with the runtime options
            runtime(args)
    except InvalidParameter as exc:
        raise reword(exc, {"cache_dir": "--cache"}) from None
    if hasattr(args, "cache"):  # a verb that reads or fills the feature cache
        from ..cache import FeatureCache

        # refuses a cache that is a file, or one that cannot take new files
        FeatureCache(args.cache).check_writable()


@contextlib.contextmanager
def max_image_env(args: argparse.Namespace):
    """``--max-image-mb`` as ``$STACKVISION_MAX_IMAGE_MB`` (decode processes see it too) for one
    command only: a later ``main()`` in the same process gets the value it had before."""
    from ..images import MAX_FILE_ENV

    mb = getattr(args, "max_image_mb", None)
    before = os.environ.get(MAX_FILE_ENV)
    if mb is not None:
        os.environ[MAX_FILE_ENV] = repr(float(mb))
    try:
        yield
    finally:
        if mb is not None:
            if before is None:
                os.environ.pop(MAX_FILE_ENV, None)
            else:
                os.environ[MAX_FILE_ENV] = before


def kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def backbone_list(text: str) -> list[str]:
    from ..readout import expand_named  # --backbones fine-grained

    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names:
        raise StackvisionError(
            f"--backbones {text!r} names no backbone", "run 'stackvision backbones' to list names"
        )
    return expand_named(names)


def add_numbers(p: argparse.ArgumentParser, rows) -> None:
    """Numeric options from a table of (flag, type, default, help); the default joins the help."""
    for flag, kind, default, text in rows:
        shown = "" if default is None else f" (default: {default:g})"
        if isinstance(default, int):
            shown = f" (default: {default})"
        p.add_argument(flag, type=kind, default=default, help=text + shown)


def duration(text: str) -> float:
    """argparse type of ``--time-limit``: seconds from 600, 90s, 20m, 1h, 1h30m."""
    from ..presets import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_tta(p: argparse.ArgumentParser, what: str) -> None:
    # the choices are validation.TTA_MODES (not imported: building the parser stays numpy-free)
    p.add_argument(
        "--tta", default="flip", choices=["none", "flip"], help=f"{what} (default: flip)"
    )


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model directory (any kind)")


def add_out(p: argparse.ArgumentParser, metavar: str, help: str, required: bool = True) -> None:
    p.add_argument("--out", required=required, metavar=metavar, help=help)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that stackvision wrote (anything else is never replaced)",
    )


def add_weights(p: argparse.ArgumentParser, help: str = "local checkpoint for a backbone") -> None:
    p.add_argument(
        "--weights", action="append", type=kv, metavar="NAME=PATH", help=help + " (repeatable)"
    )


def add_backbone_options(p: argparse.ArgumentParser) -> None:
    from ..backbones import DEFAULT_STACK

    p.add_argument(
        "--backbones",
        default=",".join(DEFAULT_STACK),
        help="comma-separated backbones to stack, NAME[@SIZE][+READOUT] (e.g. lite0@256+gem),"
        f" or a named stack: fine-grained (the default: {','.join(DEFAULT_STACK)}), classic"
        " (lite0,lite1,lite2 at their own sizes, average pooling) or fine-grained-large (the"
        " fine-grained readout at 320/336/352 px)",
    )
    p.add_argument(
        "--pool",
        default="avg",
        help="readout of each backbone: avg, max, avgmax or gem pooling of the last feature map,"
        " +midN to add the last N stages, e.g. gem+mid2 (default: avg)",
    )
    add_weights(p)


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--cache",
        metavar="DIR",
        help="feature cache folder (default: $STACKVISION_CACHE or the user cache dir)",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="auto (GPU when torch sees one), cpu, cuda, cuda:N (default: auto)",
    )
    g.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "torch", "onnx", "openvino"],
        help="inference engine: auto = torch on a GPU, else the fastest CPU engine installed "
        "(openvino, onnx, torch) (default: auto)",
    )
    g.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16", "int8"],
        help="backbone precision: int8 is quantised on ~300 of your images, bf16 needs a CPU "
        "with AVX-512 BF16 (default: fp32 for training; a saved model's own for predict)",
    )
    g.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (default: 32)"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decode threads (default: min(4, cores); min(16, cores) when the model is on a GPU)",
    )
    g.add_argument(
        "--decoder",
        default="auto",
        choices=["auto", "pil", "threads", "processes", "torchvision"],
        help="image decoding: pil (threads or processes), or torchvision on the model's device "
        "(nvJPEG on a GPU; its own feature store); auto = torchvision on CUDA, else pil "
        "(fine-tuning always decodes with PIL)",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image instead of skipping it",
    )
    g.add_argument(
        "--max-image-mb",
        type=float,
        metavar="MB",
        help="skip (list as bad) image files larger than this, before reading them "
        "(default: $STACKVISION_MAX_IMAGE_MB or 100)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r = p.add_argument_group("runner (where extraction runs; see docs/scaling.md)")
    r.add_argument(
        "--runner",
        default="local",
        choices=["local", "ray"],
        help="local: this process; ray: Ray Data tasks and actors (pip install 'stackvision[ray]')"
        " (default: local)",
    )
    r.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join (HOST:6379, ray://HOST:10001 or auto; default: a local Ray)",
    )
    r.add_argument(
        "--ray-actors",
        type=int,
        metavar="N",
        help="backbone actors per backbone (default: one per GPU, or the cluster's CPUs less one)",
    )


def add_labelled_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "data",
        nargs="?" if not required else None,
        metavar="DATA",
        help="folder with one subfolder per class (or a labels CSV)",
    )
    add_labels_csv(p)


def add_labels_csv(p: argparse.ArgumentParser, data_flag: str = "DATA") -> None:
    p.add_argument(
        "--labels",
        metavar="CSV",
        help=f"labels CSV (e.g. Kaggle 'id,breed'); images in --images or {data_flag}",
    )
    p.add_argument(
        "--images",
        metavar="DIR",
        help="folder of the images named in --labels (default: the CSV's folder)",
    )
    p.add_argument("--id-col", help="CSV column with the image id or path (default: detected)")
    p.add_argument("--label-col", help="CSV column with the class label (default: detected)")
    p.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="accept CSV ids that lead outside the images folder ('../x.jpg', absolute paths); "
        "refused by default",
    )
    p.add_argument(
        "--skip-missing-images",
        action="store_true",
        help="go on with the CSV rows that have an image file, listing the others as problems "
        "(e.g. a Kaggle labels.csv with only part of the images downloaded); refused by default",
    )


def progress_enabled(args) -> bool:
    """Progress unless ``-q``: a bar on a terminal, plain lines in a log (see progress.py)."""
    return not getattr(args, "quiet", False)


def runtime(args, **changes) -> Runtime:
    """The runtime options of a verb as one value (they never change what a model predicts)."""
    return Runtime(
        cache_dir=getattr(args, "cache", None),
        device=getattr(args, "device", "auto"),
        engine=getattr(args, "engine", "auto"),
        # None: fp32 for a new model, a saved model's own precision (int8 heads need int8 features)
        precision=getattr(args, "precision", None),
        batch_size=getattr(args, "batch_size", 32),
        workers=getattr(args, "workers", None),
        decoder=getattr(args, "decoder", "auto"),
        strict=getattr(args, "strict", False),
        progress=progress_enabled(args),
        runner=getattr(args, "runner", "local"),
        ray_address=getattr(args, "ray_address", None),
        ray_actors=getattr(args, "ray_actors", None),
    ).replace(**changes)


def listing(args, data=None):
    from ..data import load_labelled

    lst = load_labelled(
        data if data is not None else args.data,
        args.labels,
        args.images,
        args.id_col,
        args.label_col,
        allow_outside=getattr(args, "allow_outside_images", False),
        skip_missing=getattr(args, "skip_missing_images", False),
    )
    if data is None and getattr(args, "exclude", None):  # corrections (doctor.csv, edited)
        from ..corrections import apply_corrections

        lst, args.corrections = apply_corrections(lst, args.exclude)
    return lst


def add_exclude(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exclude",
        metavar="CSV",
        help="corrections to the data: a doctor.csv (edited) whose rows with action exclude are "
        "left out and relabel are given suggested_label",
    )


def labelled_or_images(args):
    """DATA as a labelled listing (``--labels``, or a folder of class subfolders), or else as
    loose images (a folder of images, image files): for verbs that take either."""
    from ..data import from_paths

    d = args.data
    if args.labels or (
        d and os.path.isdir(d) and any(os.path.isdir(os.path.join(d, c)) for c in os.listdir(d))
    ):
        return listing(args)
    return from_paths([d] if d else [])


def validation_data(args) -> tuple[list[str], list[str]] | None:
    """``--val DATA`` as (paths, labels), or None."""
    if not getattr(args, "val", None):
        return None
    from ..data import load_labelled

    vl = load_labelled(args.val)
    return vl.paths, vl.labels


def data_inputs(args) -> list[str | None]:
    """The input paths of a labelled-data verb (never written over)."""
    return [
        getattr(args, n, None)
        for n in ("data", "labels", "images", "val", "from_shards", "models", "exclude")
    ]


def check_out(args, kind: str, inputs) -> str:
    """:func:`stackvision.outputs.check_out` with this verb's flags and cache."""
    from ..cache import default_cache_dir
    from ..outputs import check_out as _check

    flat: list[str | None] = []
    for item in inputs:
        flat += item if isinstance(item, list | tuple) else [item]
    cache = getattr(args, "cache", None) or default_cache_dir()
    return _check(
        args.out, kind, overwrite=args.overwrite, inputs=flat, cache_dir=cache, flag="--out"
    )


def load_model_for(args, path: str | None = None):
    """Load a model directory of any kind with the runtime options from ``args``."""
    from ..models import load_model

    return load_model(
        path or args.model, runtime(args), weights=dict(getattr(args, "weights", None) or [])
    )


def validate_estimator(model, flags: dict[str, str] | None = None) -> None:
    """Check an estimator's parameters before any work, in command-line words."""
    try:
        model._validate_params()
    except InvalidParameter as exc:
        raise reword(exc, flags) from None
