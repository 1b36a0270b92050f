"""Eager PyTorch engine (channels-last on CPU, fp32; any CUDA device, with TF32 off)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..backbones import BackboneSpec, build_model
from ..preprocess import Normalize


class TorchEngine:
    numbers_id = "fp32"
    #: ``features`` takes a uint8 torch tensor too (crops decoded on the GPU stay there)
    takes_tensors = True

    def __init__(self, spec: BackboneSpec, pool: str = "avg", device: str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        model = build_model(spec, pool)
        # Channels-last is ~3x faster than the default layout for these convnets on x86 CPUs.
        self.model = model.to(self.device, memory_format=torch.channels_last)
        # Pixels arrive as Preprocess.to_uint8 made them (already in the backbone's channel order).
        self.normalize = Normalize(spec.preprocess).to(self.device)

    @torch.inference_mode()
    def features(self, batch) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            x = batch.to(self.device)
        else:
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = self.normalize(x).contiguous(memory_format=torch.channels_last)
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
