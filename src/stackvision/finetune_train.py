"""Training of a :class:`~stackvision.finetune.FineTunedClassifier`: the two phases (head, then
fine-tuning), which parameters learn in each, optimiser and LR schedule, and checkpoints.

The epoch loop (:meth:`FineTuneTraining._train`) runs ``head`` epochs with the backbone frozen
(features computed once when there is no augmentation), then ``finetune`` epochs with the top
``unfreeze`` blocks learning at ``finetune_lr``. Both phases: early stopping on validation loss,
reduce-LR-on-plateau, the best weights over both phases kept. After every epoch a checkpoint
(weights, best weights, optimiser, scheduler, history, epoch counter) is written atomically to
``work_dir``; fitting again with the same data and settings resumes after the last finished
epoch. Every epoch draws its shuffling, augmentation and dropout from seeds derived from (seed,
epoch), so a resumed run trains the same as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter

import numpy as np

from .data import check_trainable
from .errors import StackvisionError
from .finetune_net import backbone_blocks, exact_fp32, is_batchnorm, torch_module
from .finetune_net import loss as loss_fn
from .validation import holdout_split

CHECKPOINT = "checkpoint.safetensors"


class FineTuneTraining:
    """The training half of :class:`~stackvision.finetune.FineTunedClassifier` (a mixin: it
    reads the estimator's parameters and fitted ``net_``, ``device_``, ``augment_``...)."""

    def _training_data(self, X: list[str], y: list[str], val):
        """Decoded (images, label indices, paths) for training and for validation: ``val``'s
        images, else a stratified ``val_split`` of ``X``. Bad images go to ``problems_``."""
        index = {c: i for i, c in enumerate(self.classes_)}
        imgs, keep, problems = self._load(X)
        self.problems_ = list(problems)
        yk = np.asarray([index[y[i]] for i in keep], np.int64)
        paths = [X[i] for i in keep]
        if val is not None:
            vX, vy = self._validation_data(val)
            vimgs, vkeep, vprob = self._load(vX)
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
        return (timgs, tyk, tpaths), (vimgs, vyk, vpaths)

    def _training_record(self) -> dict:
        """The manifest's ``training`` entry: settings, epochs run, data counts."""
        counts = Counter(self.classes_[i] for i in self.train_y_)
        return {
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
            "n_problems": len(self.problems_),
        }

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
                if is_batchnorm(m):
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
        torch = torch_module()
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
                tensors[f"opt.{pid}.{k}"] = torch_module().as_tensor(v).detach().cpu().contiguous()
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

    def _train(self, timgs, tyk, vimgs, vyk, tpaths, vpaths, on_epoch_end) -> None:
        torch = torch_module()
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
                loss_each = loss_fn(logits, yb, n_classes, ls)
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
                vloss = float(loss_fn(vlog, vy_t, n_classes).mean())
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
            if self._runtime().progress:
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
        torch = torch_module()
        self.net_.backbone.eval()
        bs = int(self.batch_size)
        with torch.inference_mode(), exact_fp32(self.device_):
            out = [
                self.net_.backbone(self._to_input(imgs[i : i + bs]))
                for i in range(0, len(imgs), bs)
            ]
        return torch.cat(out).clone() if out else torch.zeros((0, self.net_.fc.in_features))


def _jsonable(d: dict) -> dict:
    def plain(o):
        if isinstance(o, np.ndarray | np.generic) or torch_module().is_tensor(o):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(d, default=plain))


def _optimizer_state(groups: list[dict], tensors: dict) -> dict:
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": groups}
