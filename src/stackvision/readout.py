"""How a frozen backbone is read out: pooling, mid-level stages and input size.

A backbone's features are its last feature map, globally pooled. Two options change that, both
part of the backbone's identity (feature cache key, ONNX export key, saved model manifest):

* **Readout** ``POOLING[+midN]``: ``POOLING`` is ``avg``, ``max``, ``avgmax`` (timm's
  ``0.5 * (avg + max)``) or ``gem`` (generalised mean, p = 3); ``+midN`` also pools the outputs
  of the last ``N`` stages (timm ``forward_intermediates``) the same way and concatenates them
  after the final features (lite0 ``gem+mid2``: 1280 + 112 + 320 = 1712 dims). Given stack-wide
  (``--pool gem+mid2``) or per backbone (``lite0+gem+mid2``, which wins).
* **Input size** ``NAME@SIZE`` (``lite0@256``): the backbone sees SIZE x SIZE crops instead of its
  pretrained size (the train/test resolution discrepancy: a convnet trained on random-resized crops
  often gives better features at a larger test size). ``crop_pct`` is kept, so the resize before
  the centre crop scales with SIZE.

The plain pools ``avg``/``max``/``avgmax`` without ``+mid`` build exactly the model they always
did (timm's own global pool), so their cache keys and saved models are unchanged. The rest runs
:class:`ReadoutNet`, an ``nn.Module`` that every engine path takes as it takes a timm model
(eager torch, the ONNX export behind ONNX Runtime and OpenVINO, the exported stack).

Named stacks (``--backbones fine-grained``) expand to a list of such names: see
:data:`NAMED_STACKS`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

from .errors import StackvisionError
from .params import Options

PLAIN = ("avg", "max", "avgmax")  # timm global pools: the model is built as it always was
POOLINGS = (*PLAIN, "gem")
GEM_P = 3.0
MAX_MID = 4
MIN_SIZE, MAX_SIZE = 64, 1024

#: ``--backbones NAME`` expansions. ``fine-grained``: each EfficientNet-Lite at a larger input
#: (about 1.1x its pretrained size), GeM pooling and the last two stages (see BENCHMARKS.md,
#: "features").
NAMED_STACKS = {
    "fine-grained": ("lite0@256+gem+mid2", "lite1@272+gem+mid2", "lite2@288+gem+mid2"),
    "classic": ("lite0", "lite1", "lite2"),
    # the same readout at ~1.35x each pretrained size: ~1.8x fine-grained's time; better on
    # cub86, worse on flowers5 (BENCHMARKS.md, "Larger inputs"), so a member of --preset best only
    "fine-grained-large": ("lite0@320+gem+mid2", "lite1@336+gem+mid2", "lite2@352+gem+mid2"),
}

_READOUT_HELP = "use avg, max, avgmax or gem, optionally with +midN (N = 1..4), e.g. gem+mid2"


@dataclass(frozen=True)
class Readout:
    """A parsed readout: pooling of every map read, and how many last stages join the final one."""

    pooling: str = "avg"
    mid: int = 0

    @property
    def text(self) -> str:
        return self.pooling + (f"+mid{self.mid}" if self.mid else "")

    @property
    def plain(self) -> bool:
        return self.mid == 0 and self.pooling in PLAIN


def parse_readout(text: str, what: str = "pooling") -> Readout:
    """``gem+mid2`` -> ``Readout("gem", 2)``; anything else is a :class:`StackvisionError`."""
    parts = [p.strip().lower() for p in str(text).split("+")]
    pooling, mid = "avg", 0
    for i, p in enumerate(parts):
        m = re.fullmatch(r"mid(\d+)", p)
        if m and not mid:
            mid = int(m.group(1))
            if not 1 <= mid <= MAX_MID:
                raise StackvisionError(f"{what} '{text}': mid{mid} is out of range", _READOUT_HELP)
        elif p in POOLINGS and i == 0:
            pooling = p
        else:
            raise StackvisionError(f"unknown {what} '{text}'", _READOUT_HELP)
    return Readout(pooling, mid)


def canonical(text: str) -> str:
    """The one spelling of a readout (``GEM + mid2`` -> ``gem+mid2``; ``mid2`` -> ``avg+mid2``)."""
    return parse_readout(text).text


class PoolOption(Options):
    """Parameter constraint for ``pool``: any readout :func:`parse_readout` accepts."""

    def __init__(self):
        super().__init__(POOLINGS)

    def accepts(self, v) -> bool:
        if not isinstance(v, str):
            return False
        try:
            parse_readout(v)
        except StackvisionError:
            return False
        return True

    def __str__(self) -> str:
        return "avg, max, avgmax or gem, optionally +midN (e.g. 'gem+mid2')"


# ---------------------------------------------------------------------- backbone names
def split_name(raw: str) -> tuple[str, int | None, str | None]:
    """``lite0@256+gem+mid2`` -> (``lite0``, 256, ``gem+mid2``); plain ``lite0`` -> (lite0, None, None)."""
    head, plus, rest = raw.strip().partition("+")
    base, at, size_text = head.partition("@")
    base = base.strip()
    size = None
    if at:
        size_text = size_text.strip()
        if not size_text.isdigit():
            raise StackvisionError(
                f"backbone '{raw}': input size '{size_text}' is not a whole number",
                "write NAME@SIZE with SIZE in pixels, e.g. lite0@256",
            )
        size = int(size_text)
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise StackvisionError(
                f"backbone '{raw}': input size {size} is outside {MIN_SIZE}..{MAX_SIZE}",
                "write NAME@SIZE with SIZE in pixels, e.g. lite0@256",
            )
    if plus and not rest.strip():
        raise StackvisionError(f"backbone '{raw}': empty readout after '+'", _READOUT_HELP)
    return base, size, canonical(rest) if plus else None


def base_name(name: str) -> str:
    """The registry name inside a backbone name (``lite0@256+gem`` -> ``lite0``)."""
    return re.split(r"[@+]", name, maxsplit=1)[0].strip()


def stack_label(names) -> str:
    """A short label for a list of backbone names: the named stack it is, else the names
    joined by ``+`` (``fine-grained``; ``lite0+lite1``)."""
    names = list(names)
    for label, members in NAMED_STACKS.items():
        if names == list(members):
            return label
    return "+".join(names)


def expand_named(names: list[str]) -> list[str]:
    """Backbone names with every named stack (``fine-grained``) replaced by its members."""
    out: list[str] = []
    for n in names:
        out.extend(NAMED_STACKS.get(n.strip().lower(), (n,)))
    return out


def of(spec, pool: str = "avg") -> str:
    """The readout a backbone is run with: its own (from its name or a stack-wide readout that is
    not a plain pool), else the stack's ``pool``."""
    return getattr(spec, "readout", None) or pool


def adjust(spec, name: str, size: int | None, readout: str | None, pool: str = "avg"):
    """``spec`` resized to ``size`` and read out with ``readout`` (else ``pool`` when that is not
    a plain pool): name, preprocessing, readout and feature dim updated."""
    ro = readout or (None if parse_readout(pool).plain else canonical(pool))
    if size is None and ro is None:
        return spec
    pp = spec.preprocess if size is None else dataclasses.replace(spec.preprocess, input_size=size)
    dim = spec.feature_dim
    if ro is not None and not parse_readout(ro).plain:
        dim = feature_dim(spec.architecture, ro, pp.input_size)
    return dataclasses.replace(spec, name=name, preprocess=pp, readout=ro, feature_dim=dim)


# ---------------------------------------------------------------------- the module
def _pool(x, pooling: str):
    import torch

    if pooling == "avg":
        return x.mean((2, 3))
    if pooling == "max":
        return x.amax((2, 3))
    if pooling == "avgmax":
        return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))
    # GeM (Radenovic et al.): (mean x^p)^(1/p) over positive activations
    return torch.clamp(x, min=1e-6).pow(GEM_P).mean((2, 3)).pow(1.0 / GEM_P)


def _torch_module_class():
    import torch
    from torch import nn

    class ReadoutNet(nn.Module):
        """A timm backbone built with ``global_pool=''``: image -> [pooled final map, pooled
        outputs of the last ``mid`` stages] concatenated, float32 (N, feature_dim)."""

        def __init__(self, model, readout: Readout):
            super().__init__()
            self.model = model
            self.pooling = readout.pooling
            self.mid = readout.mid

        def forward(self, x):
            if self.mid:
                final, inter = self.model.forward_intermediates(x, indices=self.mid)
            else:
                final, inter = self.model.forward_features(x), []
            if final.dim() != 4:
                raise StackvisionError(
                    f"readout '{self.pooling}' needs a convolutional backbone "
                    f"(a 4-D feature map), got a {final.dim()}-D output",
                    "use --pool avg with this backbone",
                )
            return torch.cat([_pool(t, self.pooling) for t in [final, *inter]], 1)

    return ReadoutNet


def wrap(model, readout: str):
    """The timm ``model`` (built without global pooling) read out as ``readout``."""
    return _torch_module_class()(model, parse_readout(readout))


def timm_pool(readout: str) -> str:
    """The ``global_pool`` to build the timm model with: its own pool, or none for ReadoutNet."""
    ro = parse_readout(readout)
    return ro.pooling if ro.plain else ""


#: stage channels (timm's ``feature_info``) and final width of the embedded backbones, kept as
#: data (checked against timm by tests/test_startup.py) so that resolving ``lite0@256+gem+mid2``
#: imports neither timm nor torch: a warm ``extract`` or ``train`` starts in a fraction of a second
STAGE_CHANNELS = {
    "tf_efficientnet_lite0": ((16, 24, 40, 112, 320), 1280),
    "tf_efficientnet_lite1": ((16, 24, 40, 112, 320), 1280),
    "tf_efficientnet_lite2": ((16, 24, 48, 120, 352), 1280),
}


@functools.lru_cache(maxsize=64)
def feature_dim(architecture: str, readout: str, size: int) -> int:
    """Feature size of ``architecture`` read out as ``readout``: from :data:`STAGE_CHANNELS`, else
    one forward on the meta device (no memory, no weights). A backbone that cannot be read out
    this way is a user error."""
    if architecture in STAGE_CHANNELS:
        stages, final = STAGE_CHANNELS[architecture]
        mid = parse_readout(readout).mid
        return final + sum(stages[len(stages) - mid :]) if mid else final
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, num_classes=0, global_pool="")
            out = wrap(model, readout)(torch.empty(1, 3, size, size))
    except StackvisionError as exc:
        raise StackvisionError(f"backbone {architecture}: {exc.problem}", exc.fix) from None
    except (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
        raise StackvisionError(
            f"backbone {architecture} cannot be read out as '{readout}' ({exc})",
            "use --pool avg with this backbone",
        ) from None
    return int(out.shape[1])
