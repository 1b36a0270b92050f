"""Checkpoints of a fine-tuning run: the run's fingerprint (data and settings), writing and
reading ``checkpoint.safetensors`` in ``work_dir`` (weights, best weights, optimiser state and
the loop's JSON state, replaced atomically), for :mod:`.finetune_train` to resume from."""

from __future__ import annotations

import hashlib
import json
import os

from .errors import StackvisionError
from .finetune_net import torch_module

CHECKPOINT = "checkpoint.safetensors"
#: the recipe parameters (:mod:`.finetune_recipes`) the manifest records
RECIPES = ("head_init", "lp_C", "lr_decay", "ema", "mixup")


class FineTuneCheckpoints:
    """The checkpoint half of the fine-tuning mixin (reads the estimator's parameters)."""

    def _fingerprint(self, train_paths, train_y, val_paths, val_y) -> str:
        params = self.get_params(deep=False)
        cfg = {
            k: params[k]
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
                *RECIPES,
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

    def _save_checkpoint(self, phase: str, loop, opt, best) -> None:
        """Weights, best weights, optimiser and loop state (JSON) in one file, replaced
        atomically: a killed run leaves the previous checkpoint intact."""
        from safetensors.torch import save_file

        torch = torch_module()
        tensors = {
            f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net_.state_dict().items()
        }
        tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best.weights.items()})
        osd = opt.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        meta = {
            "fingerprint": self._fingerprint_,
            "phase": phase,
            "loop": loop.state_dict(),
            "param_groups": osd["param_groups"],
        }
        os.makedirs(self.work_dir, exist_ok=True)
        # A fixed temporary name: the CLI's check of the work folder knows it (cli.WORK_FILES).
        path = os.path.join(self.work_dir, CHECKPOINT)
        save_file(tensors, path + ".tmp", metadata={"state": json.dumps(meta)})
        os.replace(path + ".tmp", path)

    def _read_checkpoint(self):
        """(meta, tensors) of this run's checkpoint in ``work_dir``, or None."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.path.join(self.work_dir, CHECKPOINT) if self.work_dir else None
        if not path or not os.path.isfile(path):
            return None
        restart = f"delete {self.work_dir} (or use --restart) to train from the start"
        try:
            with safe_open(path, "pt") as fh:
                meta = json.loads(fh.metadata()["state"])
            tensors = load_file(path)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is reported, not fatal
            raise StackvisionError(f"cannot read the checkpoint {path}: {exc}", restart) from None
        if meta.get("fingerprint") != self._fingerprint_:
            raise StackvisionError(
                f"{self.work_dir} holds a checkpoint of a different training run "
                "(other data or settings)",
                "rerun with the same data and options to resume, or use --restart "
                "(delete the work dir) to start over",
            )
        if "loop" not in meta:
            raise StackvisionError(f"{path} was written by an older stackvision", restart)
        return meta, tensors


def _optimizer_state(groups: list[dict], tensors: dict) -> dict:
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": groups}
