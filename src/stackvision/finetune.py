"""``FineTunedClassifier``: a pretrained backbone with a new head, fine-tuned end to end.

Network: the timm backbone from :func:`backbones.build_model` (global pooling, no classifier) ->
dropout -> dense layer -> softmax (sigmoid with one output for two classes).

Training runs in two phases on a stratified hold-out (or ``val``) used for early stopping:

1. ``head``: the backbone is frozen; only the dense layer learns (AdamW at ``lr``). Without
   augmentation the backbone's features are computed once and reused every epoch.
2. ``finetune``: the top ``unfreeze`` blocks of the backbone (or ``"all"``) learn too, at the
   lower ``finetune_lr``.

In both phases: early stopping on validation loss, reduce-LR-on-plateau, and the best weights (by
validation loss, over both phases) are the model. After every epoch a checkpoint (weights, best
weights, optimizer, scheduler, history, RNG-free epoch counter) is written atomically to the work
dir; fitting again with the same data and settings resumes after the last finished epoch. Every
epoch draws its shuffling, augmentation and dropout from seeds derived from (seed, epoch), so a
resumed run trains the same as an uninterrupted one.

Prediction averages the original and the horizontally flipped image (flip TTA) and applies a
temperature fitted on the validation predictions, like the feature-stack models.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from . import __version__
from .augment import Augment
from .backbones import POOLS, BackboneSpec, resolve
from .classifier import TTA_MODES, Predictions
from .data import Problem, check_trainable
from .decoding import DecodePool, default_kind, default_workers
from .errors import StackvisionError
from .images import ImageDecodeError
from .metrics import classification_metrics, summary_row
from .model_dir import read_manifest, read_tensors, write_model_dir
from .models import PredictMixin
from .preprocess import Preprocess
from .validation import apply_temperature, fit_temperature, holdout_split

CHECKPOINT = "checkpoint.safetensors"


# ---------------------------------------------------------------------- images
def load_images(
    paths: Sequence[str],
    pp: Preprocess,
    workers: int | None = None,
    strict: bool = False,
    decoder: str = "threads",
) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
    """Decode ``paths`` into a uint8 (N, S, S, 3) array at the input size of ``pp``.

    Returns (images, index of each kept path in ``paths``, problems of the left-out ones).
    ``decoder``: ``threads`` or ``processes`` (see :mod:`stackvision.decoding`).
    """
    s = pp.input_size
    out = np.empty((len(paths), s, s, 3), np.uint8)
    keep, problems = [], []
    step = 64
    batches = [[(p, [("x", pp)]) for p in paths[i : i + step]] for i in range(0, len(paths), step)]
    with DecodePool(workers or default_workers(), decoder) as decoding:
        for b, results in enumerate(decoding.run(batches)):
            for j, res in enumerate(results):
                i = b * step + j
                if isinstance(res, ImageDecodeError):
                    if strict:
                        raise StackvisionError(
                            f"bad image {paths[i]}: {res.reason}",
                            "remove or replace it, or run without --strict to skip bad images",
                        )
                    problems.append(Problem(paths[i], res.reason))
                    continue
                out[len(keep)] = res["x"]
                keep.append(i)
    return out[: len(keep)], np.asarray(keep, np.int64), problems


# ---------------------------------------------------------------------- network pieces
def _torch():
    import torch

    return torch


def _exact_fp32(device):
    from .engines.torch_engine import exact_fp32  # imports torch: only once a model exists

    return exact_fp32(device)


def _build_net(backbone, n_classes: int, dropout: float):
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


def logits_to_proba(logits, n_classes: int):
    """Softmax, or for two classes a sigmoid on the single output -> [1 - p, p]."""
    torch = _torch()
    if n_classes == 2:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def _loss(logits, y, n_classes: int, label_smoothing: float = 0.0):
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
    for attr in ("blocks", "stages", "layers"):
        container = getattr(model, attr, None)
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
        blocks = [b for n in layers for b in getattr(model, n)]
        tail = [m for n, m in children[names.index(layers[-1]) + 1 :]]
        return blocks, tail
    return [m for _, m in children if any(True for _ in m.parameters())], []


def _is_bn(m) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, _BatchNorm)


# ---------------------------------------------------------------------- export wrapper
def _export_module(net, pp: Preprocess, n_classes: int, tta: str, temperature: float):
    import torch
    import torch.nn as nn

    class FineTunedExport(nn.Module):
        """uint8 (N, S, S, 3) RGB at the model's input size -> float32 (N, C) probabilities."""

        def __init__(self):
            super().__init__()
            self.net = net
            mean = torch.tensor(pp.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(pp.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
            if pp.channel_order == "BGR":
                mean, std = mean.flip(1), std.flip(1)
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
            self.flip = tta == "flip"
            self.temperature = float(temperature)

        def forward(self, x):
            x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
            p = logits_to_proba(self.net(x), n_classes)
            if self.flip:
                p = (p + logits_to_proba(self.net(torch.flip(x, dims=[3])), n_classes)) / 2
            if self.temperature != 1.0:
                p = torch.softmax(torch.log(torch.clamp(p, min=1e-12)) / self.temperature, dim=1)
            return p

    return FineTunedExport().eval()


# ---------------------------------------------------------------------- the classifier
class FineTunedClassifier(PredictMixin):
    """A pretrained backbone + new dense head, fine-tuned in two phases (see the module doc).

    ``fit(paths, labels)`` trains; ``save``/``load`` use the model directory format (kind
    ``finetune``; every weight of the network is in ``weights.safetensors``, so loading needs no
    pretrained-weights download). Parameters are validated by :meth:`fit`.
    """

    kind = "finetune"

    def __init__(
        self,
        backbone: str = "lite0",
        *,
        epochs: int = 10,
        head_epochs: int = 3,
        unfreeze: int | str = 2,
        lr: float = 1e-3,
        finetune_lr: float | None = None,
        weight_decay: float = 1e-4,
        dropout: float = 0.2,
        label_smoothing: float = 0.0,
        augment: str | Augment | None = None,
        val_split: float = 0.15,
        patience: int = 3,
        lr_patience: int = 1,
        lr_factor: float = 0.3,
        input_size: int | None = None,
        tta: str = "flip",
        pool: str = "avg",
        calibrate: bool = True,
        weights: dict[str, str] | None = None,
        work_dir: str | None = None,
        device: str = "auto",
        batch_size: int = 32,
        workers: int | None = None,
        seed: int = 0,
        strict: bool = False,
        progress: bool = False,
        **ignored_runtime,
    ):
        self.backbone = backbone
        self.epochs = epochs
        self.head_epochs = head_epochs
        self.unfreeze = unfreeze
        self.lr = lr
        self.finetune_lr = finetune_lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.label_smoothing = label_smoothing
        self.augment = augment
        self.val_split = val_split
        self.patience = patience
        self.lr_patience = lr_patience
        self.lr_factor = lr_factor
        self.input_size = input_size
        self.tta = tta
        self.pool = pool
        self.calibrate = calibrate
        self.weights = weights
        self.work_dir = work_dir
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.seed = seed
        self.strict = strict
        self.progress = progress

    # ------------------------------------------------------------------ parameters
    def _check_params(self) -> None:
        def positive_int(name, v, minimum=1):
            if not isinstance(v, int) or v < minimum:
                raise StackvisionError(
                    f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {v}",
                    f"e.g. --{name.replace('_', '-')} {max(minimum, 3)}",
                )

        positive_int("epochs", self.epochs, 0)
        positive_int("head_epochs", self.head_epochs, 0)
        if self.epochs + self.head_epochs < 1:
            raise StackvisionError(
                "nothing to train: --epochs and --head-epochs are both 0", "e.g. --epochs 5"
            )
        positive_int("batch_size", self.batch_size, 1)
        positive_int("patience", self.patience, 0)
        if isinstance(self.unfreeze, str) and self.unfreeze != "all":
            try:
                self.unfreeze = int(self.unfreeze)
            except ValueError:
                raise StackvisionError(
                    f"--unfreeze must be a number of blocks or 'all', got '{self.unfreeze}'",
                    "e.g. --unfreeze 2 or --unfreeze all",
                ) from None
        if self.unfreeze != "all" and (not isinstance(self.unfreeze, int) or self.unfreeze < 0):
            raise StackvisionError(
                f"--unfreeze must be >= 0 or 'all', got {self.unfreeze}", "e.g. --unfreeze 2"
            )
        for name in ("lr", "finetune_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and v > 0):
                raise StackvisionError(
                    f"--{name.replace('_', '-')} must be positive, got {v}", "e.g. --lr 0.001"
                )
        if not 0 <= self.dropout < 1:
            raise StackvisionError(f"dropout must be in [0, 1), got {self.dropout}", "e.g. 0.2")
        if self.val_split is not None and not 0 < self.val_split < 1:
            raise StackvisionError(
                f"--val-split must be between 0 and 1, got {self.val_split}",
                "e.g. --val-split 0.15",
            )
        if self.tta not in TTA_MODES:
            raise StackvisionError(f"unknown TTA mode '{self.tta}'", "use --tta flip or --tta none")
        if self.pool not in POOLS:
            raise StackvisionError(f"unknown pooling '{self.pool}'", f"use one of {POOLS}")
        if self.input_size is not None and (
            not isinstance(self.input_size, int) or self.input_size < 32
        ):
            raise StackvisionError(
                f"--input-size must be an integer >= 32, got {self.input_size}",
                "e.g. --input-size 160, or leave it out for the backbone's own size",
            )
        self.augment_ = (
            self.augment if isinstance(self.augment, Augment) else Augment.parse(self.augment)
        )

    @property
    def preprocess(self) -> Preprocess:
        """The input preprocessing (input size = the size :meth:`to_torch_module` expects)."""
        return self.preprocess_

    @property
    def input_size_(self) -> int:
        return self.preprocess_.input_size

    def _device(self):
        from .engines import resolve_device

        return _torch().device(resolve_device(self.device))

    def _workers(self) -> int:
        return self.workers or default_workers(str(self._device()))

    def _decoder(self, n_images: int) -> str:
        return default_kind(str(self._device()), self._workers(), n_images)

    def _to_input(self, imgs: np.ndarray):
        """uint8 NHWC -> normalised float NCHW (channels-last memory) on the model's device."""
        torch = _torch()
        x = torch.from_numpy(np.ascontiguousarray(imgs)).to(self.device_)
        x = (x.permute(0, 3, 1, 2).float() - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last)

    def _setup_runtime(self) -> None:
        torch = _torch()
        self.device_ = self._device()
        pp = self.preprocess_
        mean = torch.tensor(pp.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(pp.std).view(1, 3, 1, 1) * 255.0
        if pp.channel_order == "BGR":
            mean, std = mean.flip(1), std.flip(1)
        self._mean, self._std = mean.to(self.device_), std.to(self.device_)
        self.net_ = self.net_.to(self.device_, memory_format=torch.channels_last)

    # ------------------------------------------------------------------ training helpers
    def _set_trainable(self, phase: str) -> list:
        """requires_grad + train/eval modes for a phase; returns the backbone params to train.

        Batch-norm layers stay in eval mode (running mean/var frozen) and their scale/shift stay
        frozen in every phase. Fine-tuning batches are small (often 8-32 images of few classes):
        batch statistics from them are noisy and differ from the pretrained ones, so letting BN
        normalise with them (train mode) and updating the running averages would shift every
        downstream activation away from what the pretrained weights expect, wrecking the features
        in the first steps, and train-mode and eval-mode outputs would disagree at prediction.
        """
        net = self.net_
        net.eval()
        for p in net.backbone.parameters():
            p.requires_grad_(False)
        trainable: list = []
        if phase == "finetune" and self.unfreeze:
            if self.unfreeze == "all":
                modules = [net.backbone]
            else:
                blocks, tail = backbone_blocks(net.backbone)
                modules = blocks[max(0, len(blocks) - int(self.unfreeze)) :] + tail
            for m in modules:
                m.train()
                for p in m.parameters():
                    p.requires_grad_(True)
            for m in net.backbone.modules():
                if _is_bn(m):
                    m.eval()
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)
            seen = set()
            for m in modules:
                for p in m.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        trainable.append(p)
        net.dropout.train()
        return trainable

    def _optimizer(self, phase: str, backbone_params: list):
        torch = _torch()
        if phase == "head":
            groups = [{"params": list(self.net_.fc.parameters()), "lr": float(self.lr)}]
        else:
            lr = float(self.finetune_lr or self.lr / 10)
            groups = [{"params": list(self.net_.fc.parameters()), "lr": lr}]
            if backbone_params:
                groups.append({"params": backbone_params, "lr": lr})
        opt = torch.optim.AdamW(groups, weight_decay=float(self.weight_decay))
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=float(self.lr_factor), patience=int(self.lr_patience)
        )
        return opt, sched

    def _fingerprint(self, train_paths, train_y, val_paths, val_y) -> str:
        cfg = {
            k: getattr(self, k)
            for k in (
                "backbone",
                "epochs",
                "head_epochs",
                "unfreeze",
                "lr",
                "finetune_lr",
                "weight_decay",
                "dropout",
                "label_smoothing",
                "patience",
                "lr_patience",
                "lr_factor",
                "pool",
                "batch_size",
                "seed",
            )
        }
        cfg["augment"] = self.augment_.to_dict()
        cfg["preprocess"] = self.preprocess_.to_dict()
        cfg["weights_id"] = self.spec_.weights_id
        cfg["classes"] = self.classes_
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
        for p, y in zip(train_paths, train_y):
            h.update(f"t{os.path.abspath(p)}\0{int(y)}\n".encode())
        for p, y in zip(val_paths, val_y):
            h.update(f"v{os.path.abspath(p)}\0{int(y)}\n".encode())
        return h.hexdigest()

    def _save_checkpoint(self, state: dict, opt, best_state: dict) -> None:
        from safetensors.torch import save_file

        tensors = {
            f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net_.state_dict().items()
        }
        tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best_state.items()})
        osd = opt.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = _torch().as_tensor(v).detach().cpu().contiguous()
        meta = {**state, "param_groups": osd["param_groups"]}
        os.makedirs(self.work_dir, exist_ok=True)
        path = os.path.join(self.work_dir, CHECKPOINT)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={"state": json.dumps(meta)})
        os.replace(tmp, path)  # a killed run leaves the previous checkpoint intact

    def _read_checkpoint(self):
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.path.join(self.work_dir, CHECKPOINT) if self.work_dir else None
        if not path or not os.path.isfile(path):
            return None
        try:
            with safe_open(path, "pt") as fh:
                meta = json.loads(fh.metadata()["state"])
            tensors = load_file(path)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is reported, not fatal
            raise StackvisionError(
                f"cannot read the checkpoint {path}: {exc}",
                f"delete {self.work_dir} (or use --restart) to train from the start",
            ) from None
        return meta, tensors

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        X: Sequence[str],
        y: Sequence,
        *,
        val: tuple[Sequence[str], Sequence] | None = None,
        on_epoch_end: Callable[[dict], bool | None] | None = None,
    ):
        """Fine-tune on images ``X`` with labels ``y``.

        ``val``: (paths, labels) for early stopping and metrics; otherwise a stratified
        ``val_split`` of ``X`` is held out. ``on_epoch_end(record)`` is called after each epoch
        (after its checkpoint is written) and may return True to stop training there.
        """
        torch = _torch()
        self._check_params()
        X, y = list(X), [str(v) for v in y]
        if len(X) != len(y):
            raise StackvisionError(
                f"{len(X)} images but {len(y)} labels", "give one label per image"
            )
        check_trainable(y)
        self.classes_ = sorted(set(y))
        index = {c: i for i, c in enumerate(self.classes_)}
        n_classes = len(self.classes_)
        self.spec_: BackboneSpec = resolve(self.backbone, self.weights)
        pp = self.spec_.preprocess
        self.preprocess_ = replace(pp, input_size=self.input_size) if self.input_size else pp

        imgs, keep, problems = load_images(
            X, self.preprocess_, self._workers(), self.strict, self._decoder(len(X))
        )
        self.problems_ = list(problems)
        yk = np.asarray([index[y[i]] for i in keep], np.int64)
        paths = [X[i] for i in keep]
        if val is not None:
            vX, vy = list(val[0]), [str(v) for v in val[1]]
            unknown = sorted(set(vy) - set(self.classes_))
            if unknown:
                raise StackvisionError(
                    f"validation labels not in the training classes: {', '.join(unknown[:5])}",
                    "use the same class names in --val as in the training data",
                )
            vimgs, vkeep, vprob = load_images(
                vX, self.preprocess_, self._workers(), self.strict, self._decoder(len(vX))
            )
            self.problems_ += vprob
            vyk = np.asarray([index[vy[i]] for i in vkeep], np.int64)
            vpaths = [vX[i] for i in vkeep]
            timgs, tyk, tpaths = imgs, yk, paths
        else:
            check_trainable([self.classes_[i] for i in yk], 2)
            tr, va = holdout_split(yk, self.val_split or 0.15, self.seed)
            timgs, tyk, tpaths = imgs[tr], yk[tr], [paths[i] for i in tr]
            vimgs, vyk, vpaths = imgs[va], yk[va], [paths[i] for i in va]
        del imgs
        if len(vyk) == 0:
            raise StackvisionError("no usable validation images", "check --val or --val-split")
        self.train_paths_, self.train_y_ = tpaths, tyk

        torch.manual_seed(self.seed)
        from .backbones import build_model

        self.net_ = _build_net(build_model(self.spec_, self.pool), n_classes, float(self.dropout))
        self._setup_runtime()
        self.history_: list[dict] = []
        self._train(timgs, tyk, vimgs, vyk, tpaths, vpaths, on_epoch_end)

        # Final validation predictions with TTA, temperature, metrics.
        vp = self._proba_images(vimgs, temperature=1.0)
        self.temperature_ = fit_temperature(vp, vyk) if self.calibrate else 1.0
        vp = apply_temperature(vp, self.temperature_)
        self.eval_ = (vpaths, vyk, vp)
        self.metrics_ = {
            "validation": f"hold-out ({len(vyk)} images, best epoch {self.best_epoch_})",
            **classification_metrics(vyk, vp, self.classes_),
        }
        return self

    def _train(self, timgs, tyk, vimgs, vyk, tpaths, vpaths, on_epoch_end) -> None:
        torch = _torch()
        n_classes = len(self.classes_)
        net = self.net_
        aug = self.augment_
        bs = int(self.batch_size)
        ls = float(self.label_smoothing)
        yt_all = torch.from_numpy(tyk)
        fingerprint = self._fingerprint(tpaths, tyk, vpaths, vyk)
        phase_len = {"head": int(self.head_epochs), "finetune": int(self.epochs)}
        if not self.unfreeze:
            # No backbone block to unfreeze: the fine-tune phase would just train the head more.
            phase_len = {"head": int(self.head_epochs) + int(self.epochs), "finetune": 0}

        state = {
            "fingerprint": fingerprint,
            "phase": "head" if phase_len["head"] else "finetune",
            "phase_epoch": 0,
            "epoch": 0,
            "stopped": False,
            "best_val": math.inf,
            "best_epoch": 0,
            "phase_best": math.inf,
            "bad": 0,
            "history": [],
            "sched": None,
        }
        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        saved = self._read_checkpoint()
        resume_opt = None
        if saved is not None:
            meta, tensors = saved
            if meta.get("fingerprint") != fingerprint:
                raise StackvisionError(
                    f"{self.work_dir} holds a checkpoint of a different training run "
                    "(other data or settings)",
                    "rerun with the same data and options to resume, or use --restart "
                    "(delete the work dir) to start over",
                )
            net.load_state_dict(
                {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True
            )
            best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
            state.update({k: meta[k] for k in state if k in meta})
            resume_opt = (meta["param_groups"], tensors)
            self.resumed_from_epoch_ = state["epoch"]
        else:
            self.resumed_from_epoch_ = 0
        net.to(self.device_)

        feats_cache = None  # head phase without augmentation: backbone features computed once
        vfeats = None
        opt = sched = None
        current = None
        while True:
            phase = state["phase"]
            if phase == "head" and (state["phase_epoch"] >= phase_len["head"] or state["stopped"]):
                state.update(
                    phase="finetune",
                    phase_epoch=0,
                    stopped=False,
                    bad=0,
                    phase_best=math.inf,
                    sched=None,
                )
                # Fine-tuning starts from the best head found, not the last one.
                net.load_state_dict(best_state)
                resume_opt = None
                continue
            if phase == "finetune" and (
                state["phase_epoch"] >= phase_len["finetune"] or state["stopped"]
            ):
                break
            if current != phase:
                backbone_params = self._set_trainable(phase)
                opt, sched = self._optimizer(phase, backbone_params)
                if resume_opt is not None:
                    groups, tensors = resume_opt
                    opt.load_state_dict(_optimizer_state(groups, tensors))
                    resume_opt = None
                if state["sched"]:
                    sched.load_state_dict(state["sched"])
                current = phase
            else:
                self._set_trainable(phase)

            epoch = state["epoch"]
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            torch.manual_seed(self.seed * 100_003 + epoch + 1)  # dropout
            use_cache = phase == "head" and not aug.active
            if phase == "head" and use_cache and feats_cache is None:
                feats_cache = self._backbone_features(timgs)
            if phase == "head" and vfeats is None:
                vfeats = self._backbone_features(vimgs)
            perm = torch.randperm(len(tyk), generator=g)
            tot, correct = 0.0, 0
            for i in range(0, len(perm), bs):
                idx = perm[i : i + bs]
                yb = yt_all[idx].to(self.device_)
                if use_cache:
                    logits = net.head(feats_cache[idx])
                else:
                    batch = timgs[idx.numpy()]
                    if aug.active:
                        batch = aug.batch(batch, g)
                    x = self._to_input(batch)
                    if phase == "head":
                        with torch.no_grad():
                            f = net.backbone(x)
                        logits = net.head(f)
                    else:
                        logits = net(x)
                loss_each = _loss(logits, yb, n_classes, ls)
                loss = loss_each.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss_each.detach().sum())
                pred = (logits[:, 0] > 0).long() if n_classes == 2 else logits.argmax(1)
                correct += int((pred == yb).sum())
            # Validation loss on the original view (what early stopping and the LR schedule see).
            net.eval()
            with torch.inference_mode():
                if phase == "head":
                    vlog = torch.cat([net.head(vfeats[i : i + bs]) for i in range(0, len(vyk), bs)])
                else:
                    vlog = torch.cat(
                        [net(self._to_input(vimgs[i : i + bs])) for i in range(0, len(vyk), bs)]
                    )
                vy_t = torch.from_numpy(vyk).to(self.device_)
                vloss = float(_loss(vlog, vy_t, n_classes).mean())
                vpred = (vlog[:, 0] > 0).long() if n_classes == 2 else vlog.argmax(1)
                vacc = float((vpred == vy_t).float().mean())
            record = {
                "epoch": epoch + 1,
                "phase": phase,
                "loss": tot / len(tyk),
                "accuracy": correct / len(tyk),
                "val_loss": vloss,
                "val_accuracy": vacc,
                "lr": opt.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
            sched.step(vloss)
            state["history"].append(record)
            state["epoch"] += 1
            state["phase_epoch"] += 1
            if vloss < state["best_val"] - 1e-6:
                state["best_val"], state["best_epoch"] = vloss, epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            if vloss < state["phase_best"] - 1e-4:
                state["phase_best"], state["bad"] = vloss, 0
            else:
                state["bad"] += 1
                if state["bad"] > int(self.patience):
                    state["stopped"] = True
            state["sched"] = _jsonable(sched.state_dict())
            if self.work_dir:
                self._save_checkpoint(state, opt, best_state)
            if self.progress:
                print(
                    f"epoch {record['epoch']} [{phase}] loss {record['loss']:.4f} "
                    f"acc {record['accuracy']:.3f} val_loss {vloss:.4f} val_acc {vacc:.3f} "
                    f"lr {record['lr']:.2g} ({record['seconds']:.0f} s)",
                    flush=True,
                )
            if on_epoch_end is not None and on_epoch_end(record):
                break
        net.load_state_dict(best_state)
        net.to(self.device_)
        net.eval()
        self.history_ = state["history"]
        self.best_epoch_ = state["best_epoch"]
        self.stopped_early_ = bool(state["stopped"])

    def _backbone_features(self, imgs: np.ndarray):
        torch = _torch()
        self.net_.backbone.eval()
        bs = int(self.batch_size)
        with torch.inference_mode(), _exact_fp32(self.device_):
            out = [
                self.net_.backbone(self._to_input(imgs[i : i + bs]))
                for i in range(0, len(imgs), bs)
            ]
        return torch.cat(out).clone() if out else torch.zeros((0, self.net_.fc.in_features))

    # ------------------------------------------------------------------ predict
    def _check_fitted(self):
        if not hasattr(self, "net_"):
            raise StackvisionError(
                "this FineTunedClassifier is not fitted yet",
                "call fit() or FineTunedClassifier.load()",
            )

    def _proba_images(self, imgs: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Flip-TTA probabilities of a uint8 NHWC batch (temperature applied unless 1.0)."""
        torch = _torch()
        n_classes = len(self.classes_)
        net = self.net_
        net.eval()
        bs = int(self.batch_size)
        out = []
        # Training may use TF32; predictions do not, so they match the CPU and the ONNX export.
        with torch.inference_mode(), _exact_fp32(self.device_):
            for i in range(0, len(imgs), bs):
                x = self._to_input(imgs[i : i + bs])
                p = logits_to_proba(net(x), n_classes)
                if self.tta == "flip":
                    p = (p + logits_to_proba(net(torch.flip(x, dims=[3])), n_classes)) / 2
                out.append(p.double().cpu().numpy())
        proba = np.concatenate(out) if out else np.zeros((0, n_classes))
        t = self.temperature_ if temperature is None else temperature
        return apply_temperature(proba, t)

    def predict_paths(self, X: Sequence[str]) -> Predictions:
        """Probabilities for every usable image in ``X``; unusable ones are listed in ``problems``."""
        self._check_fitted()
        X = list(X)
        t0 = time.perf_counter()
        kept, probas, problems = [], [], []
        chunk = max(256, 8 * int(self.batch_size))  # bounded memory for long lists
        for s in range(0, len(X), chunk):
            part = X[s : s + chunk]
            imgs, keep, probs = load_images(
                part, self.preprocess_, self._workers(), self.strict, self._decoder(len(part))
            )
            problems += probs
            kept += [part[i] for i in keep]
            probas.append(self._proba_images(imgs))
        proba = np.concatenate(probas) if probas else np.zeros((0, len(self.classes_)))
        secs = time.perf_counter() - t0
        stats = {
            "n_images": len(X),
            "n_used": len(kept),
            "n_bad": len(problems),
            "seconds": round(secs, 3),
            "images_per_second": round(len(kept) / secs, 2) if kept and secs > 0 else None,
        }
        return Predictions(kept, proba, list(self.classes_), problems, stats)

    def to_torch_module(self):
        """A ``torch.nn.Module`` for export: uint8 (N, S, S, 3) RGB -> (N, C) probabilities.

        Input contract: S = ``self.preprocess.input_size``; each image already resized and
        centre-cropped by ``self.preprocess.to_uint8`` (the same pixels :meth:`predict_paths`
        feeds). Normalisation, flip TTA (when the model uses it) and the temperature are inside.
        Columns follow ``classes_``. The module is on the CPU, in eval mode.
        """
        self._check_fitted()
        import copy

        net = copy.deepcopy(self.net_).cpu().eval()
        net = net.to(memory_format=_torch().contiguous_format)
        return _export_module(
            net, self.preprocess_, len(self.classes_), self.tta, self.temperature_
        )

    # ------------------------------------------------------------------ persistence
    def _manifest(self) -> dict:
        counts = Counter(self.classes_[i] for i in self.train_y_)
        return {
            "kind": self.kind,
            "stackvision_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "classes": list(self.classes_),
            "backbone": {**self.spec_.to_dict(), "pool": self.pool},
            "preprocess": self.preprocess_.to_dict(),
            "input": {
                "size": self.preprocess_.input_size,
                "contract": "uint8 NHWC RGB, resized and centre-cropped by preprocess.to_uint8",
            },
            "head": {
                "output": "sigmoid" if len(self.classes_) == 2 else "softmax",
                "dropout": self.dropout,
            },
            "tta": self.tta,
            "temperature": self.temperature_,
            "seed": self.seed,
            "training": {
                "epochs": self.epochs,
                "head_epochs": self.head_epochs,
                "unfreeze": self.unfreeze,
                "lr": self.lr,
                "finetune_lr": self.finetune_lr or self.lr / 10,
                "weight_decay": self.weight_decay,
                "label_smoothing": self.label_smoothing,
                "batch_size": self.batch_size,
                "augment": self.augment_.to_dict(),
                "epochs_run": len(self.history_),
                "best_epoch": self.best_epoch_,
                "n_images": int(len(self.train_y_)),
                "per_class": dict(sorted(counts.items())),
                "n_problems": len(getattr(self, "problems_", [])),
            },
            "metrics": summary_row(self.metrics_) if getattr(self, "metrics_", None) else None,
        }

    def save(self, path: str, *, report: bool = True) -> str:
        """Write the model directory: manifest, every network weight, metrics, history, report."""
        self._check_fitted()
        tensors = {
            k: v.detach().cpu().contiguous().numpy() for k, v in self.net_.state_dict().items()
        }
        files = {"history.json": [self.history_]}
        metrics = getattr(self, "metrics_", None)
        if metrics:
            files["metrics.json"] = {
                **metrics,
                "problems": [p.__dict__ for p in getattr(self, "problems_", [])],
            }

        def add_report(tmp):
            if report and metrics and getattr(self, "eval_", None):
                from .report import write_report

                paths, y, proba = self.eval_
                write_report(
                    os.path.join(tmp, "report"),
                    metrics,
                    paths,
                    y,
                    proba,
                    self.classes_,
                    histories=[self.history_],
                    problems=getattr(self, "problems_", []),
                    title=f"stackvision fine-tuned model: {self.spec_.name}",
                )

        return write_model_dir(path, self._manifest(), tensors, files, add_report)

    @classmethod
    def load(cls, path: str, *, weights=None, **runtime) -> FineTunedClassifier:
        """Load a ``finetune`` model directory. ``runtime``: device, batch_size, workers, strict,
        progress (cache_dir, engine, precision and weights are accepted and not needed)."""
        manifest = read_manifest(path)
        tensors = read_tensors(path, manifest)  # validated before the slow imports
        import timm

        torch = _torch()
        if manifest.get("kind") != cls.kind:
            raise StackvisionError(
                f"{path} holds a '{manifest.get('kind', 'stack')}' model, not a fine-tuned one",
                "use stackvision.load_model()",
            )
        keep = ("device", "batch_size", "workers", "strict", "progress")
        bb = manifest["backbone"]
        model = cls(
            bb["name"],
            tta=manifest["tta"],
            pool=bb["pool"],
            dropout=manifest["head"]["dropout"],
            seed=manifest.get("seed", 0),
            **{k: v for k, v in runtime.items() if k in keep and v is not None},
        )
        model.classes_ = list(manifest["classes"])
        model.preprocess_ = Preprocess.from_dict(manifest["preprocess"])
        model.spec_ = BackboneSpec(
            name=bb["name"],
            architecture=bb["architecture"],
            source=bb["source"],
            preprocess=Preprocess.from_dict(bb["preprocess"]),
            feature_dim=bb["feature_dim"],
        )
        backbone = timm.create_model(
            bb["architecture"], pretrained=False, num_classes=0, global_pool=bb["pool"]
        )
        net = _build_net(backbone, len(model.classes_), float(manifest["head"]["dropout"]))
        try:
            net.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
        except RuntimeError as exc:
            raise StackvisionError(
                f"the weights in {path} do not fit {bb['architecture']}: {str(exc)[:200]}",
                "the model directory is damaged or from another stackvision; train it again",
            ) from None
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        model.net_ = net
        model.temperature_ = float(manifest.get("temperature", 1.0))
        model.manifest_ = manifest
        model.metrics_ = None
        model.augment_ = Augment.from_dict(manifest.get("training", {}).get("augment"))
        model._setup_runtime()
        return model


def _jsonable(d: dict) -> dict:
    return json.loads(
        json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def _optimizer_state(groups: list[dict], tensors: dict) -> dict:
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": groups}
