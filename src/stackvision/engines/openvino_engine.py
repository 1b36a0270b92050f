"""OpenVINO engine (CPU): the exported uint8-input graph, fp32, bf16 or NNCF int8.

Tuning measured on a 2-core AVX-512 EPYC, lite0 at batch 32: the LATENCY hint (one stream using
every core) with one synchronous request beats THROUGHPUT (one stream per core, two requests in
flight) -- 187 vs 182 img/s async, 53 img/s sync -- so a single synchronous request is used.
``INFERENCE_PRECISION_HINT`` is pinned to f32 for fp32: on CPUs with AVX512-BF16/AMX OpenVINO
otherwise silently computes in bfloat16 (2x faster, but features off by ~1e-2).
"""

from __future__ import annotations

import numpy as np

from ..backbones import BackboneSpec
from .compiled import Calibration, cpu_threads, export_onnx, quantize_nncf, quantize_ort


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
        import openvino as ov

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
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(self.path), "CPU", config)
        self._request = self.compiled.create_infer_request()

    def features(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        self._request.infer({0: x})
        # The request reuses its output buffer: copy before the next call.
        return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)
