"""Reading a ``finetune`` model directory back into a
:class:`~stackvision.finetune.FineTunedClassifier` (validated manifest and weights first)."""

from __future__ import annotations

from .augment import Augment
from .backbones import BackboneSpec
from .errors import StackvisionError
from .finetune_net import load_net
from .model_dir import read_manifest, read_tensors, read_training_hashes
from .preprocess import Preprocess

#: training settings the manifest records and ``load`` gives back as parameters
KEPT = (
    "epochs", "head_epochs", "unfreeze", "lr", "weight_decay", "label_smoothing", "batch_size",
    "head_init", "lp_C", "lr_decay", "ema", "mixup",
)  # fmt: skip


def load_finetuned(cls, path: str, runtime=None):
    """The model in ``path`` as an instance of ``cls``, to run with ``runtime``."""
    manifest = read_manifest(path)
    tensors = read_tensors(path, manifest)  # validated before the slow imports
    if manifest.get("kind") != cls.kind:
        raise StackvisionError(
            f"{path} holds a '{manifest.get('kind', 'stack')}' model, not a fine-tuned one",
            "use stackvision.load_model()",
        )
    bb, training = manifest["backbone"], manifest.get("training", {})
    pp = Preprocess.from_dict(manifest["preprocess"])
    bb_pp = Preprocess.from_dict(bb["preprocess"])
    kept = {k: training[k] for k in KEPT if k in training}
    if "lr" in kept and training.get("finetune_lr") != kept["lr"] / 10:
        kept["finetune_lr"] = training["finetune_lr"]
    model = cls(
        bb["name"],
        **kept,
        augment=Augment.from_dict(training.get("augment")),
        tta=manifest["tta"],
        pool=bb["pool"],
        dropout=manifest["head"]["dropout"],
        input_size=None if pp.input_size == bb_pp.input_size else pp.input_size,
        seed=manifest.get("seed", 0),
        runtime=runtime,
    )
    model.classes_ = list(manifest["classes"])
    model.preprocess_ = pp
    model.spec_ = BackboneSpec(
        name=bb["name"],
        architecture=bb["architecture"],
        source=bb["source"],
        preprocess=bb_pp,
        feature_dim=bb["feature_dim"],
    )
    net = load_net(
        bb["architecture"], bb["pool"], len(model.classes_), manifest["head"]["dropout"],
        tensors, path,
    )  # fmt: skip
    model.net_ = net
    model.manifest_, model.training_hashes_ = manifest, read_training_hashes(path)
    model.metrics_, model.eval_, model.problems_ = None, None, []
    model.history_ = []
    model.best_epoch_ = training.get("best_epoch")
    model.augment_ = model.augment
    model._setup_runtime()
    model.temperature_ = float(manifest.get("temperature", 1.0))
    return model
