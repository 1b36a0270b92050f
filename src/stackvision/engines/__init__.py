"""Inference engines: run a frozen backbone on a uint8 NHWC batch and return pooled features.

An engine knows nothing about the feature cache. ``numbers_id`` names what changes the numbers it
produces (precision); engines whose features agree to 1e-3 share one id and therefore one cache.

* ``torch``: eager PyTorch, channels-last; the only engine for CUDA devices.
* ``onnx``: ONNX Runtime on the CPU, running the backbone's cached ONNX export (uint8 input).
* ``openvino``: OpenVINO on the CPU, same ONNX export; the fastest CPU engine here.
* ``auto``: torch on a GPU, else the fastest installed CPU engine (openvino, onnx, torch).

Precisions: ``fp32`` (every engine; numbers id ``fp32``), ``bf16`` (openvino; id ``bf16``) and
``int8`` (openvino via NNCF, or onnx via ONNX Runtime static QDQ quantisation; calibrated on the
user's images, id ``int8-<method>-<calibration set>``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Protocol

import numpy as np

from ..backbones import BackboneSpec
from ..errors import StackvisionError
from .compiled import Calibration

ENGINES = ("torch", "onnx", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
_PRECISIONS = {"torch": ("fp32",), "onnx": ("fp32", "int8"), "openvino": PRECISIONS}
# "auto" on the CPU: fastest first (lite0, batch 32, 2 cores: openvino 187 img/s, onnx 117,
# torch channels-last 57).
_CPU_ORDER = ("openvino", "onnx", "torch")
_PACKAGES = {"torch": ("torch",), "onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}

__all__ = [
    "ENGINES",
    "PRECISIONS",
    "Calibration",
    "Engine",
    "available_engines",
    "create_engine",
    "numbers_id",
    "resolve_device",
    "resolve_engine",
]


class Engine(Protocol):
    spec: BackboneSpec
    numbers_id: str

    def features(self, batch: np.ndarray) -> np.ndarray:
        """uint8 array (N, H, W, 3) -> float32 array (N, feature_dim)."""
        ...


def _no_gpu_driver() -> bool:
    """True when no NVIDIA or AMD GPU driver is loaded, so torch could not see a GPU either;
    answering that without importing torch saves ~1.3 s on every CPU-only command."""
    return not any(
        os.path.exists(p)
        for p in ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")
    )


def resolve_device(device: str = "auto") -> str:
    if device in (None, "", "auto"):
        if sys.platform == "linux" and _no_gpu_driver():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StackvisionError(
            f"device '{device}' requested but torch sees no CUDA GPU", "use --device cpu or auto"
        )
    if device not in ("cpu",) and not device.startswith("cuda") and device != "mps":
        raise StackvisionError(f"unknown device '{device}'", "use auto, cpu, cuda or cuda:N")
    return device


def _installed(engine: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in _PACKAGES[engine])


def available_engines() -> list[str]:
    """The engines whose packages are installed."""
    return [e for e in ENGINES if _installed(e)]


def resolve_engine(engine: str = "auto", device: str = "auto", precision: str = "fp32") -> str:
    """The concrete engine that ``engine`` (possibly ``auto``) means for this device and precision."""
    if engine not in (*ENGINES, "auto"):
        raise StackvisionError(
            f"unknown engine '{engine}'", f"use one of: auto, {', '.join(ENGINES)}"
        )
    if precision not in PRECISIONS:
        raise StackvisionError(
            f"unknown precision '{precision}'", f"use one of: {', '.join(PRECISIONS)}"
        )
    if engine == "auto":
        dev = resolve_device(device)
        if dev != "cpu" and precision == "fp32":
            return "torch"
        for name in _CPU_ORDER:
            if precision in _PRECISIONS[name] and _installed(name):
                return name
        wants = [n for n in _CPU_ORDER if precision in _PRECISIONS[n]]
        raise StackvisionError(
            f"precision '{precision}' needs one of the engines {', '.join(wants)}, "
            "and none is installed",
            "install the fast extra: pip install 'stackvision[fast]', or use --precision fp32",
        )
    if not _installed(engine):
        missing = [p for p in _PACKAGES[engine] if importlib.util.find_spec(p) is None]
        raise StackvisionError(
            f"engine '{engine}' needs the package(s) {', '.join(missing)}",
            "install the fast extra: pip install 'stackvision[fast]', or use --engine auto",
        )
    if precision not in _PRECISIONS[engine]:
        ok = [e for e in ENGINES if precision in _PRECISIONS[e]]
        raise StackvisionError(
            f"precision '{precision}' is not available for engine '{engine}'",
            f"use --precision fp32, or --engine {' or '.join(ok)}",
        )
    if engine != "torch" and device not in (None, "", "auto", "cpu"):
        raise StackvisionError(
            f"engine '{engine}' runs on the CPU only, not on device '{device}'",
            "use --engine torch (or auto) for a GPU, or --device cpu",
        )
    return engine


def _int8_method(engine: str) -> str:
    if engine == "openvino" and importlib.util.find_spec("nncf") is not None:
        return "nncf"
    return "ort"


def create_engine(
    spec: BackboneSpec,
    pool: str = "avg",
    engine: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    *,
    cache_dir: str | None = None,
    calibration: Calibration | None = None,
    threads: int | None = None,
) -> Engine:
    """Build the engine named ``engine`` for one backbone.

    ``cache_dir`` is the feature cache root (default ``cache.default_cache_dir()``); compiled
    engines keep their ONNX export and quantised models under ``<cache_dir>/engines``.
    ``calibration`` (required for int8) names the images the int8 model is calibrated on.
    ``threads`` overrides the intra-op thread count of the CPU engines (default: all cores).
    """
    name = resolve_engine(engine, device, precision)
    if precision == "int8" and calibration is None:
        raise StackvisionError(
            "precision int8 needs calibration images",
            "pass calibration=Calibration.from_images(paths, spec), or use fp32",
        )
    if name == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(spec, pool=pool, device=resolve_device(device))
    if name == "onnx":
        from .onnx_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(spec, pool, cache_dir, precision, calibration, threads)
    from .openvino_engine import OpenVINOEngine

    return OpenVINOEngine(spec, pool, cache_dir, precision, calibration, threads)


def numbers_id(
    engine: str = "auto",
    precision: str = "fp32",
    calibration: Calibration | str | None = None,
    device: str = "auto",
) -> str:
    """What goes into the cache key for this engine/precision.

    ``fp32`` for every fp32 engine (they agree to 1e-3); ``bf16``; for int8,
    ``int8-<nncf|ort>-<calibration key>`` when the calibration set is given (int8 numbers depend
    on the quantiser and the calibration images), else plain ``int8``.
    """
    if precision != "int8":
        return precision
    if calibration is None:
        return "int8"
    key = calibration if isinstance(calibration, str) else calibration.key
    return f"int8-{_int8_method(resolve_engine(engine, device, precision))}-{key}"
