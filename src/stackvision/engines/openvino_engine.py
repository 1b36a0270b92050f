"""OpenVINO engine (CPU): the exported uint8-input graph, fp32, bf16 or NNCF int8.

Tuning measured on a 2-core AVX-512 EPYC, lite0 at batch 32: the LATENCY hint (one stream using
every core) with one synchronous request beats THROUGHPUT (one stream per core, two requests in
flight) -- 187 vs 182 img/s async, 53 img/s sync -- so a single synchronous request is used.
``INFERENCE_PRECISION_HINT`` is pinned to f32 for fp32: on CPUs with AVX512-BF16/AMX OpenVINO
otherwise silently computes in bfloat16 (2x faster, but features off by ~1e-2).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

import numpy as np

from ..backbones import BackboneSpec
from .compiled import (
    Calibration,
    _atomic_tmp,
    cpu_threads,
    export_onnx,
    quantize_nncf,
    quantize_ort,
)


def nncf_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


class OpenVINOEngine:
    def __init__(
        self,
        spec: BackboneSpec,
        pool: str = "avg",
        cache_dir: str | None = None,
        precision: str = "fp32",
        calibration: Calibration | None = None,
        threads: int | None = None,
        hint: str = "LATENCY",
    ):
        self.spec = spec
        if precision == "int8":
            if nncf_available():
                self.path = quantize_nncf(spec, pool, calibration, cache_dir)
                self.numbers_id = f"int8-nncf-{calibration.key}"
            else:  # OpenVINO runs ONNX Runtime's QDQ models as int8 too
                self.path = quantize_ort(spec, pool, calibration, cache_dir)
                self.numbers_id = f"int8-ort-{calibration.key}"
        else:
            self.path = export_onnx(spec, pool, cache_dir)
            self.numbers_id = precision
        config = {
            "PERFORMANCE_HINT": hint,
            "INFERENCE_NUM_THREADS": threads or cpu_threads(),
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        }
        self.compiled = compile_cached(self.path, config)
        self._request = self.compiled.create_infer_request()

    def features(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        # start_async + wait rather than infer(): the same single request, but the calling thread
        # sleeps without holding the GIL, so the decode threads keep running. With infer() the
        # pipeline reached 64% of model-only throughput on lite0 (2 cores), with this 83%.
        self._request.start_async({0: x})
        self._request.wait()
        # The request reuses its output buffer: copy before the next call.
        return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def _cpu_signature() -> str:
    """What a compiled CPU blob depends on besides the model: the processor and its ISA flags."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read().split("\n\n")[0]
        return hashlib.sha256(info.encode()).hexdigest()[:16] if "flags" in info else ""
    except OSError:
        return platform.processor() or platform.machine()


def compile_cached(path: str, config: dict):
    """``core.compile_model(path, "CPU", config)``, reusing an exported blob when there is one.

    Compiling lite0 from ONNX takes ~0.18 s, importing the blob ~0.04 s; that is paid by every
    ``extract``/``predict`` call, per backbone. OpenVINO's own CACHE_DIR writes its blob in place,
    so a second process could read it half-written; here the blob goes to a temporary name and is
    moved into place, and its name covers the model file, the config, the OpenVINO version and the
    processor (a cache directory may be shared between machines). An unreadable blob is rebuilt.
    """
    from .no_telemetry import import_openvino

    ov = import_openvino()
    core = ov.Core()
    sig = json.dumps(
        [os.path.basename(path), sorted(config.items()), ov.__version__, _cpu_signature()],
        default=str,
    )
    blob = os.path.splitext(path)[0] + f".ov-{hashlib.sha256(sig.encode()).hexdigest()[:16]}.blob"
    if os.path.exists(blob):
        try:
            with open(blob, "rb") as fh:
                return core.import_model(fh.read(), "CPU", config)
        except Exception:  # stale or damaged: compile again and overwrite it
            pass
    compiled = core.compile_model(core.read_model(path), "CPU", config)
    tmp = _atomic_tmp(blob, ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(compiled.export_model().getvalue())
        os.replace(tmp, blob)
    except Exception:  # caching is an optimisation: a read-only cache dir still works
        if os.path.exists(tmp):
            os.remove(tmp)
    return compiled
