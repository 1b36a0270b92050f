"""``FineTunedClassifier``: a pretrained backbone with a new head, fine-tuned end to end.

Network: the timm backbone from :func:`backbones.build_model` (global pooling, no classifier) ->
dropout -> dense layer -> softmax (sigmoid with one output for two classes).

Training (:mod:`.finetune_train`) runs a ``head`` phase (backbone frozen, only the dense layer
learns at ``lr``), then a ``finetune`` phase (the top ``unfreeze`` blocks, or ``"all"``, learn too
at ``finetune_lr``) on a stratified hold-out (or ``val``) used for early stopping; checkpoints in
``work_dir`` let an interrupted fit resume.

Recipes (:mod:`.finetune_recipes`): ``head_init="lp"`` (LP-FT: the head starts as the logistic
regression fitted on the frozen features, replacing the head phase), ``lr_decay`` (layer-wise),
``ema`` (average of the weights), ``mixup``, ``time_limit`` (stop cleanly, best weights kept).

Modules: this one (the estimator: parameters, fit, predictions, save), :mod:`.finetune_net`
(images, network, export module), :mod:`.finetune_train` (phases, epoch loop, checkpoints),
:mod:`.finetune_recipes`, :mod:`.finetune_load` (reading a model directory).

Prediction averages the original and the horizontally flipped image (flip TTA) and applies a
temperature fitted on the validation predictions, like the feature-stack models.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from . import model_dir
from .augment import Augment
from .backbones import POOLS, BackboneSpec, resolve
from .base import ModelBase, Predictions
from .data import check_trainable
from .decoding import decode_crops, default_kind, default_workers
from .errors import StackvisionError
from .finetune_net import (
    backbone_blocks,
    build_net,
    exact_fp32,
    export_module,
    logits_to_proba,
    torch_module,
)
from .finetune_recipes import Deadline
from .finetune_train import CHECKPOINT, HEAD_INITS, FineTuneTraining
from .metrics import classification_metrics, summary_row
from .params import Interval, InvalidParameter, Options
from .preprocess import Preprocess
from .runtime import Runtime
from .validation import TTA_MODES, apply_temperature, fit_temperature

__all__ = ["CHECKPOINT", "FineTunedClassifier", "backbone_blocks"]

_COUNT = Interval(numbers.Integral, 0, None)
_RATE = Interval(numbers.Real, 0, None, "neither")
_FRACTION = Interval(numbers.Real, 0, 1, "left")


class FineTunedClassifier(FineTuneTraining, ModelBase):
    """A pretrained backbone + new dense head, fine-tuned in two phases (see the module doc).

    ``fit(paths, labels)`` trains; ``save``/``load`` use the model directory format (kind
    ``finetune``; every weight of the network is in ``weights.safetensors``, so loading needs no
    pretrained-weights download). Parameters are checked by :meth:`fit`. ``batch_size`` is the
    training batch (it changes the model); ``runtime`` (:class:`Runtime`) gives the device,
    decode workers, prediction batch size, ``strict`` and ``progress`` (per-epoch lines).
    """

    kind = "finetune"
    _fitted_attribute = "temperature_"
    _parameter_constraints = {
        "backbone": [str],
        "epochs": [_COUNT],
        "head_epochs": [_COUNT],
        "unfreeze": [_COUNT, Options(["all"])],
        "lr": [_RATE],
        "finetune_lr": [_RATE, None],
        "weight_decay": [Interval(numbers.Real, 0, None)],
        "dropout": [_FRACTION],
        "label_smoothing": [_FRACTION],
        "augment": [str, Augment, None],
        "val_split": [Interval(numbers.Real, 0, 1, "neither"), None],
        "patience": [_COUNT],
        "lr_patience": [_COUNT],
        "lr_factor": [Interval(numbers.Real, 0, 1, "neither")],
        "input_size": [Interval(numbers.Integral, 32, None), None],
        "tta": [Options(TTA_MODES)],
        "pool": [Options(POOLS)],
        "calibrate": [bool],
        "weights": [dict, None],
        "work_dir": [str, os.PathLike, None],
        "batch_size": [Interval(numbers.Integral, 1, None)],
        "seed": [Interval(numbers.Integral, 0, None)],
        "head_init": [Options(HEAD_INITS)],
        "lp_C": [_RATE],
        "lr_decay": [Interval(numbers.Real, 0, 1, "right")],
        "ema": [Interval(numbers.Real, 0, 1, "left")],
        "mixup": [Interval(numbers.Real, 0, None)],
        "time_limit": [_RATE, None],
        "runtime": [Runtime, None],
    }
    _parameter_fixes = {
        "unfreeze": "a number of blocks, e.g. 2, or 'all'",
        "input_size": "e.g. 160, or None for the backbone's own size",
        "val_split": "e.g. 0.15",
        "lr": "e.g. 0.001",
        "lr_decay": "e.g. 0.7 (1: no decay)",
        "ema": "e.g. 0.99 (0: off)",
        "mixup": "e.g. 0.2 (0: off)",
        "time_limit": "seconds, e.g. 600",
    }
    metrics_: dict | None = None
    lp_: dict | None = None  # LP-FT: the probe's validation numbers
    deadline_: Deadline | None = None

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
        val_split: float | None = 0.15,
        patience: int = 3,
        lr_patience: int = 1,
        lr_factor: float = 0.3,
        input_size: int | None = None,
        tta: str = "flip",
        pool: str = "avg",
        calibrate: bool = True,
        weights: dict[str, str] | None = None,
        work_dir: str | None = None,
        batch_size: int = 32,
        seed: int = 0,
        head_init: str = "random",
        lp_C: float = 0.05,
        lr_decay: float = 1.0,
        ema: float = 0.0,
        mixup: float = 0.0,
        time_limit: float | None = None,
        runtime: Runtime | None = None,
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
        self.batch_size = batch_size
        self.seed = seed
        self.head_init, self.lp_C, self.lr_decay = head_init, lp_C, lr_decay
        self.ema, self.mixup, self.time_limit = ema, mixup, time_limit
        self.runtime = runtime

    # ------------------------------------------------------------------ parameters
    def _check_params(self) -> None:
        if self.epochs + self.head_epochs < 1 and self.head_init != "lp":
            raise InvalidParameter(
                "epochs", self.epochs, "at least 1 when head_epochs is 0", "e.g. epochs=5",
                type(self).__name__,
            )  # fmt: skip
        self._augment()

    def _augment(self) -> Augment:
        if isinstance(self.augment, Augment):
            self.augment.check()
            return self.augment
        try:
            return Augment.parse(self.augment)
        except StackvisionError as exc:
            raise InvalidParameter(
                "augment", self.augment, "a preset or key=value settings", str(exc),
                type(self).__name__,
            ) from None  # fmt: skip

    def _device(self):
        from .engines import resolve_device

        return torch_module().device(resolve_device(self._runtime().device))

    def _workers(self) -> int:
        return self._runtime().workers or default_workers(str(self._device()))

    def _decoder(self, n: int) -> str:  # PIL only: --decoder threads|processes is kept
        d, dev = self._runtime().decoder, str(self._device())
        return d if d in ("threads", "processes") else default_kind(dev, self._workers(), n)

    def _load(self, paths: list[str]):
        return decode_crops(
            paths,
            self.preprocess_,
            workers=self._workers(),
            kind=self._decoder(len(paths)),
            strict=self._runtime().strict,
        )

    def _to_input(self, imgs: np.ndarray, order: str | None = None):
        """uint8 NHWC (``order``: None for ``preprocess_``'s channel order, or "RGB") ->
        normalised float NCHW (channels-last memory) on the model's device."""
        torch = torch_module()
        x = torch.from_numpy(np.ascontiguousarray(imgs)).to(self.device_)
        x = self._normalize[order](x)
        return x.contiguous(memory_format=torch.channels_last)

    def _setup_runtime(self) -> None:
        from .preprocess import Normalize

        torch = torch_module()
        self.device_ = self._device()
        self._normalize = {
            o: Normalize(self.preprocess_, o).to(self.device_) for o in (None, "RGB")
        }
        self.net_ = self.net_.to(self.device_, memory_format=torch.channels_last)

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
        torch = torch_module()
        self._validate_params()
        self.deadline_ = Deadline(self.time_limit)  # counts from here: decoding included
        X, y = self._labelled(X, y)
        check_trainable(y)
        self.augment_ = self._augment()
        self.classes_ = sorted(set(y))
        n_classes = len(self.classes_)
        self.spec_: BackboneSpec = resolve(self.backbone, self.weights)
        pp = self.spec_.preprocess
        self.preprocess_ = replace(pp, input_size=self.input_size) if self.input_size else pp

        (timgs, tyk, tpaths), (vimgs, vyk, vpaths) = self._training_data(X, y, val)
        self.train_paths_, self.train_y_ = tpaths, tyk
        self.training_hashes_ = frozenset(h for h in model_dir.file_hashes(tpaths) if h)

        torch.manual_seed(self.seed)
        from .backbones import build_model

        self.net_ = build_net(build_model(self.spec_, self.pool), n_classes, float(self.dropout))
        self._setup_runtime()
        self.history_: list[dict] = []
        self._train(timgs, tyk, vimgs, vyk, tpaths, vpaths, on_epoch_end)

        # Final validation predictions with TTA, temperature, metrics.
        vp = self._proba_images(vimgs, temperature=1.0)
        temperature = fit_temperature(vp, vyk) if self.calibrate else 1.0
        vp = apply_temperature(vp, temperature)
        self.eval_ = (vpaths, vyk, vp)
        self.metrics_ = {
            "validation": f"hold-out ({len(vyk)} images, best epoch {self.best_epoch_})",
            **classification_metrics(vyk, vp, self.classes_),
        }
        self.manifest_ = None
        self.temperature_ = temperature
        return self

    # ------------------------------------------------------------------ predict
    def _proba_images(
        self, imgs: np.ndarray, temperature: float | None = None, order: str | None = None
    ) -> np.ndarray:
        """Flip-TTA probabilities of a uint8 NHWC batch in channel ``order`` (see
        :meth:`_to_input`; temperature applied unless 1.0)."""
        torch = torch_module()
        n_classes = len(self.classes_)
        net = self.net_
        net.eval()
        bs = self._runtime().batch_size
        out = []
        # Training may use TF32; predictions do not, so they match the CPU and the ONNX export.
        with torch.inference_mode(), exact_fp32(self.device_):
            for i in range(0, len(imgs), bs):
                x = self._to_input(imgs[i : i + bs], order)
                p = logits_to_proba(net(x), n_classes)
                if self.tta == "flip":
                    p = (p + logits_to_proba(net(torch.flip(x, dims=[3])), n_classes)) / 2
                out.append(p.double().cpu().numpy())
        proba = np.concatenate(out) if out else np.zeros((0, n_classes))
        t = self.temperature_ if temperature is None else temperature
        return apply_temperature(proba, t)

    def predict_paths(self, X: Sequence[str]) -> Predictions:
        """Probabilities for every usable image in ``X``; unusable ones are listed in ``problems``."""
        self.check_is_fitted()
        X = list(X)
        t0 = time.perf_counter()
        kept, probas, problems = [], [], []
        chunk = max(256, 8 * self._runtime().batch_size)  # bounded memory for long lists
        for s in range(0, len(X), chunk):
            part = X[s : s + chunk]
            imgs, keep, probs = self._load(part)
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

    # ------------------------------------------------------------------ fixed-size input (export, serving)
    def input_preprocess(self) -> Preprocess:
        """The uint8 input of :meth:`forward_uint8` and the export: the model's preprocessing
        (backbone's, at ``input_size``), in RGB order."""
        self.check_is_fitted()
        return replace(self.preprocess_, channel_order="RGB")

    def forward_uint8(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for a uint8 RGB batch (N, S, S, 3) made by
        :func:`stackvision.export.prepare_image` (S = ``input_preprocess().input_size``): the
        pixels :meth:`predict_paths` feeds the network."""
        from .export import check_uint8_batch

        self.check_is_fitted()
        batch = check_uint8_batch(batch, self.preprocess_.input_size)
        return self._proba_images(batch, order="RGB")

    def to_torch_module(self):
        """:meth:`forward_uint8` as one ``torch.nn.Module`` on the CPU, in eval mode:
        normalisation, flip TTA (when the model uses it) and the temperature are inside; columns
        follow ``classes_``."""
        import copy

        self.check_is_fitted()
        net = copy.deepcopy(self.net_).cpu().eval()
        net = net.to(memory_format=torch_module().contiguous_format)
        return export_module(net, self.preprocess_, len(self.classes_), self.tta, self.temperature_)

    def describe(self) -> dict:
        """What serving shows at GET /model: kind, classes, backbone, preprocessing, head,
        temperature, metrics, versions."""
        self.check_is_fitted()
        manifest = self.manifest_ or self._manifest()
        return {
            "kind": self.kind,
            "classes": list(self.classes_),
            "backbones": [self.spec_.to_dict()],
            "preprocess": self.preprocess_.to_dict(),
            "head": manifest.get("head"),
            "tta": self.tta,
            "temperature": self.temperature_,
            "training": manifest.get("training"),
            "metrics": manifest.get("metrics"),
            "created": manifest.get("created"),
            "stackvision_version": manifest.get("stackvision_version"),
        }

    # ------------------------------------------------------------------ persistence
    def _manifest(self) -> dict:
        return {
            **self._manifest_head(),
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
            "training": self._training_record(),
            "metrics": summary_row(self.metrics_) if self.metrics_ else None,
        }

    def save(self, path: str, *, report: bool = True) -> str:
        """Write the model directory: manifest, every network weight, metrics, history, report."""
        self.check_is_fitted()
        tensors = {
            k: v.detach().cpu().contiguous().numpy() for k, v in self.net_.state_dict().items()
        }
        return self._write_dir(
            path,
            self.manifest_ or self._manifest(),
            tensors,
            histories=[self.history_],
            title=f"stackvision fine-tuned model: {self.spec_.name}",
            report=report,
        )

    @classmethod
    def load(
        cls, path: str, runtime: Runtime | None = None, *, weights=None
    ) -> FineTunedClassifier:
        """Load a ``finetune`` model directory, to run with ``runtime`` (device, workers,
        prediction batch size, strict). Every weight is in the directory: ``weights`` is not
        needed (accepted like every kind's ``load``)."""
        from .finetune_load import load_finetuned

        return load_finetuned(cls, path, runtime)
