"""The fine-tuned network: images in, backbone + dense head, probabilities out.

* :func:`build_net`: timm backbone (global pooling, no classifier) -> dropout -> dense layer;
  :func:`logits_to_proba` (softmax, or a sigmoid on one output for two classes), :func:`loss`;
* :func:`backbone_blocks`: a backbone's blocks from input to output (what ``unfreeze`` counts);
* :func:`export_module`: the whole prediction (normalisation, flip TTA, temperature) as one
  ``torch.nn.Module`` taking uint8 RGB images, for ONNX export.

Torch is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

from .backbones import frozen
from .errors import StackvisionError
from .preprocess import Preprocess


# ---------------------------------------------------------------------- network pieces
def torch_module():
    import torch

    return torch


def exact_fp32(device):
    from .engines.torch_engine import exact_fp32  # imports torch: only once a model exists

    return exact_fp32(device)


def build_net(backbone, n_classes: int, dropout: float):
    import torch.nn as nn

    class FineTuneNet(nn.Module):
        """backbone (pooled features) -> dropout -> dense; logits (N, C) or (N, 1) for 2 classes."""

        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.dropout = nn.Dropout(dropout)
            self.fc = nn.Linear(backbone.num_features, 1 if n_classes == 2 else n_classes)

        def head(self, feats):
            return self.fc(self.dropout(feats))

        def forward(self, x):
            return self.head(self.backbone(x))

    return FineTuneNet()


def load_net(architecture: str, pool: str, n_classes: int, dropout: float, tensors, path: str):
    """The network of a saved model: ``architecture`` built without pretrained weights, every
    weight from ``tensors`` (eval mode, frozen)."""
    import timm

    torch = torch_module()
    backbone = timm.create_model(architecture, pretrained=False, num_classes=0, global_pool=pool)
    net = build_net(backbone, n_classes, float(dropout))
    try:
        net.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    except RuntimeError as exc:
        raise StackvisionError(
            f"the weights in {path} do not fit {architecture}: {str(exc)[:200]}",
            "the model directory is damaged or from another stackvision; train it again",
        ) from None
    return frozen(net)


def logits_to_proba(logits, n_classes: int):
    """Softmax, or for two classes a sigmoid on the single output -> [1 - p, p]."""
    torch = torch_module()
    if n_classes == 2:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def loss(logits, y, n_classes: int, label_smoothing: float = 0.0):
    """Per-image loss: binary cross-entropy on the one output for two classes, else softmax
    cross-entropy (both with optional label smoothing)."""
    import torch.nn.functional as F

    if n_classes == 2:
        t = y.float()
        if label_smoothing:
            t = t * (1 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none")
    return F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)


def backbone_blocks(model) -> tuple[list, list]:
    """(blocks from input to output, modules after the blocks) of a timm backbone.

    EfficientNet/MobileNet/ViT keep their blocks in ``blocks`` (EfficientNet: stages of blocks,
    flattened here), ConvNeXt in ``stages``, ResNets in ``layer1..layer4``. The modules after the
    blocks (EfficientNet's ``conv_head``/``bn2``, a ViT's final ``norm``) belong to the top and are
    unfrozen with any ``unfreeze >= 1``.
    """
    import torch.nn as nn

    children = list(model.named_children())
    names = [n for n, _ in children]
    containers = dict(children)
    for attr in ("blocks", "stages", "layers"):
        container = containers.get(attr)
        if isinstance(container, nn.Sequential | nn.ModuleList) and len(container):
            blocks = []
            for child in container:
                if isinstance(child, nn.Sequential | nn.ModuleList) and len(child):
                    blocks.extend(child)
                else:
                    blocks.append(child)
            tail = [m for n, m in children[names.index(attr) + 1 :]]
            return blocks, tail
    layers = [n for n in ("layer1", "layer2", "layer3", "layer4") if n in names]
    if layers:
        blocks = [b for n in layers for b in containers[n]]
        tail = [m for n, m in children[names.index(layers[-1]) + 1 :]]
        return blocks, tail
    return [m for _, m in children if any(True for _ in m.parameters())], []


def is_batchnorm(m) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, _BatchNorm)


# ---------------------------------------------------------------------- export wrapper
def export_module(net, pp: Preprocess, n_classes: int, tta: str, temperature: float):
    """uint8 (N, S, S, 3) **RGB** at ``pp.input_size`` -> float32 (N, C) probabilities: channel
    order and normalisation of ``pp``, the network, flip TTA, temperature. ``net`` is used as is
    (put it on the CPU in eval mode first)."""
    import torch
    import torch.nn as nn

    from .preprocess import Normalize

    class FineTunedModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.normalize = Normalize(pp, "RGB")
            self.flip = tta == "flip"
            self.temperature = float(temperature)

        def forward(self, x):
            x = self.normalize(x)
            p = logits_to_proba(self.net(x), n_classes)
            if self.flip:
                p = (p + logits_to_proba(self.net(torch.flip(x, dims=[3])), n_classes)) / 2
            if self.temperature != 1.0:
                p = torch.softmax(torch.log(torch.clamp(p, min=1e-12)) / self.temperature, dim=1)
            return p

    return FineTunedModule().eval()
