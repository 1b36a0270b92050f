"""Shared code of the compiled CPU engines (ONNX Runtime, OpenVINO): ONNX export, int8 quantisation.

The exported graph takes exactly what :meth:`Preprocess.to_uint8` produces -- a uint8 NHWC batch --
and does the float conversion and mean/std normalisation itself, then runs the pooled backbone
(``backbones.build_model(spec, pool)``); the batch axis is dynamic. The same wrapper module
(:func:`normalised_extractor`) is what a full-model export (features + head) should wrap.

On-disk layout, next to the feature cache (``root`` is the feature cache root)::

    root/engines/<key>.onnx                       fp32 export
    root/engines/<key>.json                       what the key was made of, for people
    root/engines/<key>-int8-nncf-<calib>.xml/.bin  OpenVINO IR quantised by NNCF
    root/engines/<key>-int8-ort-<calib>.onnx       ONNX Runtime static QDQ quantisation
    root/engines/<model>.ov-<hash>.blob           OpenVINO compiled model (openvino_engine.py)

``key`` = first 24 hex digits of sha256 over weights id, architecture, pool, preprocessing and the
export format version; ``calib`` identifies the calibration set (see :class:`Calibration`). Files
are written to a temporary name and moved into place with ``os.replace``, so a reader never sees a
half-written file and two processes exporting at once are harmless.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import readout
from ..atomic import atomic_open
from ..backbones import BackboneSpec
from ..errors import StackvisionError

EXPORT_FORMAT = "onnx-uint8-nhwc-v1"
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "features"
CALIBRATION_SIZE = 300

# Counters, for tests and benchmarks: how many exports/quantisations this process actually ran.
counters = {"exports": 0, "quantizations": 0}


def cpu_threads() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def engines_dir(cache_dir: str | None = None) -> str:
    if cache_dir is None:
        from ..cache import default_cache_dir

        cache_dir = default_cache_dir()
    return os.path.join(cache_dir, "engines")


def export_fields(spec: BackboneSpec, pool: str) -> dict:
    return {
        "format": EXPORT_FORMAT,
        "architecture": spec.architecture,
        "weights": spec.weights_id,
        "preprocess": spec.preprocess.to_dict(),
        "pool": readout.of(spec, pool),
    }


def export_key(spec: BackboneSpec, pool: str) -> str:
    blob = json.dumps(export_fields(spec, pool), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def normalised_extractor(spec: BackboneSpec, pool: str = "avg"):
    """``build_model(spec, pool)`` behind :class:`~stackvision.preprocess.Normalize`: uint8 NHWC
    (as ``to_uint8`` makes it) -> features; the same arithmetic as :class:`TorchEngine`."""
    import torch

    from ..backbones import build_model
    from ..preprocess import Normalize

    class NormalisedExtractor(torch.nn.Module):
        def __init__(self, model, pp):
            super().__init__()
            self.model = model
            self.normalize = Normalize(pp)

        def forward(self, images):  # uint8 (N, H, W, 3)
            return self.model(self.normalize(images))

    return NormalisedExtractor(build_model(spec, pool), spec.preprocess).eval()


#: a temporary file this old was left by a killed build (a build in progress is younger)
STALE_TMP_SECONDS = 3600.0
# what _atomic_tmp names: <final>.<8 mkstemp characters><suffix> (and the .bin beside an .xml)
_TMP_NAME = re.compile(
    r"\.(onnx|xml|blob)\.[a-z0-9_]{8}(\.onnx\.tmp|\.pre\.onnx|\.xml|\.bin|\.tmp)$"
)


def sweep_stale_tmp(folder: str, max_age: float = STALE_TMP_SECONDS) -> list[str]:
    """Remove the temporary files of builds killed over ``max_age`` seconds ago from ``folder``
    (an engines folder); returns their names. Never fails: this is tidying."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not _TMP_NAME.search(name):
            continue
        full = os.path.join(folder, name)
        try:
            if now - os.lstat(full).st_mtime > max_age:
                os.remove(full)
                removed.append(name)
        except OSError:
            pass
    return removed


def _atomic_tmp(final: str, suffix: str) -> str:
    os.makedirs(os.path.dirname(final), exist_ok=True)
    sweep_stale_tmp(os.path.dirname(final))
    fd, tmp = tempfile.mkstemp(
        prefix=os.path.basename(final) + ".", suffix=suffix, dir=os.path.dirname(final)
    )
    os.close(fd)
    return tmp


def _write_json(path: str, data: dict) -> None:
    if os.path.exists(path):
        return
    with atomic_open(path, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)


def export_onnx(spec: BackboneSpec, pool: str = "avg", cache_dir: str | None = None) -> str:
    """Path of the cached fp32 ONNX export of ``spec``'s pooled extractor; exports it if missing."""
    base = os.path.join(engines_dir(cache_dir), export_key(spec, pool))
    path = base + ".onnx"
    sweep_stale_tmp(os.path.dirname(base))
    if os.path.exists(path):
        return path
    import torch

    try:
        import onnx  # noqa: F401  (the legacy exporter needs it to serialise)
    except ImportError:
        raise StackvisionError(
            "the onnx/openvino engines need the package onnx",
            "install the fast extra: pip install 'stackvision[fast]', or use --engine torch",
        ) from None
    module = normalised_extractor(spec, pool)
    size = spec.preprocess.input_size
    dummy = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    tmp = _atomic_tmp(path, ".onnx.tmp")
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: no onnxscript dependency, and it folds the
            # TF-"same" padding of the EfficientNet-Lite convolutions to constants.
            torch.onnx.export(
                module,
                (dummy,),
                tmp,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
            )
        os.replace(tmp, path)
    except Exception as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise StackvisionError(
            f"could not export backbone '{spec.name}' ({spec.architecture}) to ONNX: {exc}",
            "use --engine torch for this backbone",
        ) from None
    counters["exports"] += 1
    _write_json(base + ".json", {**export_fields(spec, pool), "backbone": spec.name})
    return path


# --------------------------------------------------------------------------------------------
# Calibration sets for int8


@dataclass(frozen=True)
class Calibration:
    """The images an int8 engine is calibrated on.

    ``key`` identifies the set (it goes into the quantised model's file name and the engine's
    ``numbers_id``); ``batches`` yields uint8 NHWC batches (``Preprocess.to_uint8`` output) and is
    only called when no quantised model with this key is cached. ``batches=None`` means "look up
    a cached model only" (e.g. at prediction time, reusing the model calibrated at training time).
    """

    key: str
    batches: Callable[[], Iterable[np.ndarray]] | None = None

    @classmethod
    def from_arrays(cls, batches: Sequence[np.ndarray]) -> Calibration:
        """From uint8 batches already in memory; the key is a hash of their bytes."""
        batches = [np.ascontiguousarray(b, dtype=np.uint8) for b in batches]
        h = hashlib.sha256()
        for b in batches:
            h.update(str(b.shape).encode())
            h.update(b.tobytes())
        return cls(key=h.hexdigest()[:16], batches=lambda: iter(batches))

    @classmethod
    def from_images(
        cls,
        paths: Sequence[str],
        spec: BackboneSpec,
        hashes: Sequence[str | None] | None = None,
        n: int = CALIBRATION_SIZE,
        batch_size: int = 32,
    ) -> Calibration:
        """``n`` of the user's images, chosen by content hash (so the same set, whatever the order
        of ``paths`` or which images are already cached); decoded lazily, only on a cache miss."""
        from ..cache import content_hash
        from ..images import ImageDecodeError, decode, read_bytes

        if hashes is None:
            hashes = []
            for p in paths:
                try:
                    hashes.append(content_hash(read_bytes(p)))
                except ImageDecodeError:
                    hashes.append(None)
        by_hash: dict[str, str] = {}
        for p, h in zip(paths, hashes):
            if h is not None:
                by_hash.setdefault(h, p)
        chosen = sorted(by_hash)[:n]
        if not chosen:
            raise StackvisionError(
                "no usable images to calibrate the int8 engine on", "use --precision fp32"
            )
        key = hashlib.sha256(",".join(chosen).encode()).hexdigest()[:16]
        pp = spec.preprocess

        def batches():
            buf = []
            for h in chosen:
                path = by_hash[h]
                try:
                    buf.append(pp.to_uint8(decode(read_bytes(path), path, min_side=pp.resize_size)))
                except ImageDecodeError:
                    continue
                if len(buf) == batch_size:
                    yield np.stack(buf)
                    buf = []
            if buf:
                yield np.stack(buf)

        return cls(key=key, batches=batches)


def _calibration_batches(calib: Calibration, what: str) -> list[np.ndarray]:
    if calib.batches is None:
        raise StackvisionError(
            f"no cached int8 model for {what} calibrated on set {calib.key}",
            "extract features with --precision int8 on the training images first, or use fp32",
        )
    out = [np.ascontiguousarray(b, dtype=np.uint8) for b in calib.batches()]
    out = [b for b in out if len(b)]
    if not out:
        raise StackvisionError(f"empty calibration set for {what}", "use --precision fp32")
    return out


def _int8_path(spec, pool: str, calib: Calibration, cache_dir, tool: str, ext: str) -> str:
    """Where a quantised model lives: per export, quantiser and calibration set."""
    return os.path.join(
        engines_dir(cache_dir), f"{export_key(spec, pool)}-int8-{tool}-{calib.key}{ext}"
    )


def quantize_nncf(
    spec: BackboneSpec, pool: str, calib: Calibration, cache_dir: str | None = None
) -> str:
    """Path of the NNCF-quantised OpenVINO IR (.xml, with its .bin); quantises it if missing."""
    xml = _int8_path(spec, pool, calib, cache_dir, "nncf", ".xml")
    if os.path.exists(xml):
        return xml
    batches = _calibration_batches(calib, spec.name)
    onnx_path = export_onnx(spec, pool, cache_dir)
    import logging

    # nncf imports torch's cpp_extension, which warns about CUDA on CPU-only machines.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from .no_telemetry import import_nncf, import_openvino

    nncf, ov = import_nncf(), import_openvino()

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(onnx_path)
    # Batches of <= 16 images: NNCF counts dataset items, so subset_size = number of items.
    items = [b[i : i + 16] for b in batches for i in range(0, len(b), 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = nncf.quantize(
            model,
            nncf.Dataset(items),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(items),
        )
    tmp = _atomic_tmp(xml, ".xml")
    tmp_bin = tmp[:-4] + ".bin"
    try:
        ov.save_model(qmodel, tmp, compress_to_fp16=False)
        # .bin first: the .xml's presence is what marks the pair as complete.
        os.replace(tmp_bin, xml[:-4] + ".bin")
        os.replace(tmp, xml)
    finally:
        for p in (tmp, tmp_bin):
            if os.path.exists(p):
                os.remove(p)
    counters["quantizations"] += 1
    return xml


def quantize_ort(
    spec: BackboneSpec, pool: str, calib: Calibration, cache_dir: str | None = None
) -> str:
    """Path of the ONNX Runtime static-QDQ int8 model; quantises it if missing."""
    path = _int8_path(spec, pool, calib, cache_dir, "ort", ".onnx")
    if os.path.exists(path):
        return path
    batches = _calibration_batches(calib, spec.name)
    onnx_path = export_onnx(spec, pool, cache_dir)
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        # One image per call: ORT's histogram collector stacks each tensor's outputs over calls
        # with np.asarray and fails on a ragged last batch (seen with onnxruntime 1.30).
        def __init__(self):
            self._it = (b[i : i + 1] for b in batches for i in range(len(b)))

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {INPUT_NAME: b}

    pre = _atomic_tmp(path, ".pre.onnx")
    tmp = _atomic_tmp(path, ".onnx.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(onnx_path, pre, skip_symbolic_shape=True)
            quantize_static(
                pre,
                tmp,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # Percentile clipping: mean cosine to fp32 0.964 vs 0.928 with MinMax (lite0).
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        os.replace(tmp, path)
    finally:
        for p in (pre, tmp):
            if os.path.exists(p):
                os.remove(p)
    counters["quantizations"] += 1
    return path
