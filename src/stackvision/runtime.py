"""``Runtime``: how and where a model runs, as one value.

Runtime options never change what a model predicts (up to float rounding): where features are
cached, which device and inference engine run the networks, batch size, decode workers, whether a
bad image is an error, progress output, and the Ray runner's settings. Every model kind takes
them as one ``runtime=Runtime(...)`` parameter (``None``: the defaults), and ``load_model(path,
runtime=...)`` passes them to whatever kind it loads.

``precision`` is the one option a saved model remembers: ``None`` means fp32 for a new model and
the saved model's own precision on load (an int8 model's heads expect int8 features).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass

from .params import Interval, Options, check_known, validate_params

PRECISIONS = ("fp32", "bf16", "int8")  # as stackvision.engines.PRECISIONS (no torch import here)
RUNNERS = ("local", "ray")
DECODERS = ("auto", "pil", "threads", "processes", "torchvision")  # as stackvision.gpu_decode

_POSITIVE = Interval(numbers.Integral, 1, None)
_CONSTRAINTS = {
    "cache_dir": [str, os.PathLike, None],
    "device": [str],
    "engine": [str],
    "precision": [Options(PRECISIONS), None],
    "batch_size": [_POSITIVE],
    "workers": [Interval(numbers.Integral, 0, None), None],
    "decoder": [Options(DECODERS)],
    "strict": [bool],
    "progress": [bool],
    "runner": [Options(RUNNERS)],
    "ray_address": [str, None],
    "ray_actors": [_POSITIVE, None],
}


@dataclass(frozen=True, repr=False)
class Runtime:
    """Options that change how a model runs, not what it predicts (see the module doc).

    ``cache_dir``: feature cache root (``None``: the default cache). ``device``: ``auto``, ``cpu``,
    ``cuda``... ``engine``: ``auto``, ``torch``, ``onnx``, ``openvino``. ``precision``: ``fp32``,
    ``bf16``, ``int8`` or ``None`` (see the module doc). ``batch_size``: images per inference
    batch. ``workers``: image decode workers (``None`` or 0: picked per device). ``decoder``:
    ``auto``, ``pil``, ``threads``, ``processes`` or ``torchvision`` (decoding on the model's
    device; its pixels, and so its cached features, are its own: :mod:`stackvision.gpu_decode`). ``strict``: a bad image
    is an error instead of being skipped. ``progress``: show progress. ``runner``: ``local`` or
    ``ray`` (feature extraction), with ``ray_address`` and ``ray_actors`` for Ray.
    """

    cache_dir: str | None = None
    device: str = "auto"
    engine: str = "auto"
    precision: str | None = None
    batch_size: int = 32
    workers: int | None = None
    decoder: str = "auto"
    strict: bool = False
    progress: bool = False
    runner: str = "local"
    ray_address: str | None = None
    ray_actors: int | None = None

    def __post_init__(self):
        validate_params(_CONSTRAINTS, dataclasses.asdict(self), owner="Runtime")

    def __repr__(self) -> str:  # only what differs from the defaults
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"Runtime({', '.join(changed)})"

    def replace(self, **changes) -> Runtime:
        """A copy with ``changes`` applied (unknown names raise, with a suggestion)."""
        check_known(changes, FIELDS, "Runtime", "runtime option")
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, runtime: Runtime | dict | None = None, **options) -> Runtime:
        """``runtime`` (a :class:`Runtime`, a dict of its fields or ``None``) with ``options``
        (field names as keywords) applied: one place that turns what callers hold into a value."""
        if runtime is None:
            runtime = cls()
        elif isinstance(runtime, dict):
            options = {**runtime, **options}
            runtime = cls()
        elif not isinstance(runtime, Runtime):
            from .params import InvalidParameter

            raise InvalidParameter("runtime", runtime, "a Runtime, a dict or None")
        return runtime.replace(**options) if options else runtime


FIELDS = tuple(f.name for f in dataclasses.fields(Runtime))
