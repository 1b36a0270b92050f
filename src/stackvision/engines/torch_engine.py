"""Eager PyTorch engine (channels-last on CPU, fp32; any CUDA device, with TF32 off)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..backbones import BackboneSpec, build_model


class TorchEngine:
    numbers_id = "fp32"

    def __init__(self, spec: BackboneSpec, pool: str = "avg", device: str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        model = build_model(spec, pool)
        # Channels-last is ~3x faster than the default layout for these convnets on x86 CPUs.
        self.model = model.to(self.device, memory_format=torch.channels_last)
        pp = spec.preprocess
        self._mean = torch.tensor(pp.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(pp.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._bgr = pp.channel_order == "BGR"

    @torch.inference_mode()
    def features(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        # Preprocess.to_uint8 already applied channel order; mean/std are in RGB order.
        mean, std = (
            (self._mean.flip(1), self._std.flip(1)) if self._bgr else (self._mean, self._std)
        )
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with exact_fp32(self.device):
            return self.model(x).float().cpu().numpy()


def exact_fp32(device):
    """Context for fp32 inference that gives the CPU's numbers on a GPU.

    cuDNN convolutions default to TF32 on Ampere and newer GPUs (10-bit mantissa): on an H200 that
    moved lite0..2 features by 1e-2 to 3e-2 against the CPU, with TF32 off by 4e-6 (see
    BENCHMARKS.md, GPU paths). Features share one cache store across engines only if they agree to
    1e-3, and a model should predict the same on a GPU server as in its CPU/ONNX export.
    """
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
