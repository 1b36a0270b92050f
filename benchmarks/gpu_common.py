"""What ``gpu_pipeline.py`` and ``gpu_prototype.py`` share: the device, timing, nvJPEG, the
network on a batch already on the GPU (and as a CUDA graph)."""

from __future__ import annotations

import time

#: where the network and nvJPEG run; ``--device cpu`` is a smoke test of this script's logic
DEVICE = "cuda"  # main() sets it from --device


def sync() -> None:
    import torch

    if DEVICE != "cpu":
        torch.cuda.synchronize()


def side_stream():
    """(context for work on a side stream, function returning an event recorded on it)."""
    import contextlib

    import torch

    if DEVICE == "cpu":
        return contextlib.nullcontext(), lambda: None
    stream = torch.cuda.Stream()

    def event():
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    return torch.cuda.stream(stream), event


def rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def nvjpeg(datas, device=None):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(d, dtype=torch.uint8) for d in datas]
    out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device or DEVICE)
    return out if isinstance(out, list) else [out]


def forward(eng, x):
    """The engine's ``features`` on a uint8 NHWC batch already on the GPU."""
    import torch

    from stackvision.engines.torch_engine import exact_fp32

    with torch.inference_mode():
        y = eng.normalize(x).contiguous(memory_format=torch.channels_last)
        with exact_fp32(eng.device):
            return eng.model(y).float().cpu().numpy()


class Graphed:
    """The engine's network captured as a CUDA graph for one batch shape: a replay is one launch
    instead of ~200 kernel launches from Python (each holding the GIL). Smaller batches are
    padded into the static input (rows are independent in eval mode)."""

    def __init__(self, eng, bs: int):
        import torch

        s = eng.spec.preprocess.input_size
        self.eng = eng
        self.x = torch.zeros((bs, s, s, 3), dtype=torch.uint8, device=DEVICE)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.y = self._run()

    def _run(self):
        import torch

        from stackvision.engines.torch_engine import exact_fp32

        with torch.inference_mode():
            y = self.eng.normalize(self.x).contiguous(memory_format=torch.channels_last)
            with exact_fp32(self.eng.device):
                return self.eng.model(y).float()

    def __call__(self, x):
        import torch

        n = len(x)
        with torch.inference_mode():
            self.x[:n].copy_(x if isinstance(x, torch.Tensor) else torch.from_numpy(x))
            self.graph.replay()
            return self.y[:n].cpu().numpy()
