"""Inference engines: run a frozen backbone on a uint8 NHWC batch and return pooled features.

An engine knows nothing about files or caches. ``numbers_id`` names what changes the numbers it
produces (precision); engines whose features agree to 1e-3 share one id and therefore one cache.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..backbones import BackboneSpec
from ..errors import StackvisionError

ENGINES = ("torch",)


class Engine(Protocol):
    spec: BackboneSpec
    numbers_id: str

    def features(self, batch: np.ndarray) -> np.ndarray:
        """uint8 array (N, H, W, 3) -> float32 array (N, feature_dim)."""
        ...


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StackvisionError(
            f"device '{device}' requested but torch sees no CUDA GPU", "use --device cpu or auto"
        )
    if device not in ("cpu",) and not device.startswith("cuda") and device != "mps":
        raise StackvisionError(f"unknown device '{device}'", "use auto, cpu, cuda or cuda:N")
    return device


def create_engine(
    spec: BackboneSpec,
    pool: str = "avg",
    engine: str = "torch",
    device: str = "auto",
    precision: str = "fp32",
) -> Engine:
    """Build the engine named ``engine`` for one backbone."""
    if engine not in ENGINES:
        raise StackvisionError(f"unknown engine '{engine}'", f"use one of: {', '.join(ENGINES)}")
    if precision != "fp32":
        raise StackvisionError(
            f"precision '{precision}' is not available for engine '{engine}'", "use fp32"
        )
    from .torch_engine import TorchEngine

    return TorchEngine(spec, pool=pool, device=resolve_device(device))


def numbers_id(engine: str = "torch", precision: str = "fp32") -> str:
    """What goes into the cache key for this engine/precision (fp32 engines agree to 1e-3)."""
    return precision
