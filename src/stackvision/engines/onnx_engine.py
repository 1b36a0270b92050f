"""ONNX Runtime engine (CPU): the exported uint8-input graph, fp32 or static-QDQ int8."""

from __future__ import annotations

import numpy as np

from ..backbones import BackboneSpec
from .compiled import INPUT_NAME, Calibration, cpu_threads, export_onnx, quantize_ort


class OnnxRuntimeEngine:
    def __init__(
        self,
        spec: BackboneSpec,
        pool: str = "avg",
        cache_dir: str | None = None,
        precision: str = "fp32",
        calibration: Calibration | None = None,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        self.spec = spec
        if precision == "int8":
            self.path = quantize_ort(spec, pool, calibration, cache_dir)
            self.numbers_id = f"int8-ort-{calibration.key}"
        else:
            self.path = export_onnx(spec, pool, cache_dir)
            self.numbers_id = "fp32"
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or cpu_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])

    def features(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        (out,) = self.session.run(None, {INPUT_NAME: x})
        return np.asarray(out, dtype=np.float32)
