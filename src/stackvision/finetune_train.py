"""Training of a :class:`~stackvision.finetune.FineTunedClassifier`: the two phases (head, then
fine-tuning), which parameters learn in each, the optimiser, and checkpoints.

Each phase is a :class:`~stackvision.training.TrainingLoop`: ``head`` epochs with the backbone
frozen (features computed once when there is no augmentation), then ``finetune`` epochs with the
top ``unfreeze`` blocks learning at ``finetune_lr``. Each phase has its own early stopping and
reduce-LR-on-plateau; one history and one :class:`~stackvision.training.BestWeights` span both,
and phase 2 starts from the best weights of phase 1. After every epoch a checkpoint (weights,
best weights, optimiser, loop state) is written atomically to ``work_dir``; fitting again with
the same data and settings resumes after the last finished epoch. Every epoch draws its
shuffling, augmentation and dropout from seeds derived from (seed, epoch), so a resumed run
trains the same as an uninterrupted one.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .data import check_trainable
from .duplicates import content_groups
from .errors import StackvisionError
from .finetune_checkpoint import CHECKPOINT, RECIPES, FineTuneCheckpoints, _optimizer_state
from .finetune_net import backbone_blocks, exact_fp32, is_batchnorm, logits_to_proba, torch_module
from .finetune_net import loss as loss_fn
from .finetune_recipes import WeightEMA, calibrated_loss, decayed_groups, lp_init, mixup
from .training import BestWeights, EarlyStopping, Hook, ReduceLROnPlateau, TrainingLoop
from .validation import holdout_split

HEAD_INITS = ("random", "lp")
__all__ = ["CHECKPOINT", "HEAD_INITS", "FineTuneTraining"]


class FineTuneTraining(FineTuneCheckpoints):
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
            # identical files stay on one side, or early stopping would see training images
            groups = content_groups(paths)
            tr, va = holdout_split(yk, self.val_split or 0.15, self.seed, groups)
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
            **{k: v for k, v in self.get_params(deep=False).items() if k in RECIPES},
            "linear_probe": self.lp_,
            "time_limit": self.time_limit,
            "stopped_by_time_limit": bool(self.deadline_ and self.deadline_.hit),
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
            if backbone_params and float(self.lr_decay) < 1:
                groups = decayed_groups(self.net_, backbone_params, lr, float(self.lr_decay))
            elif backbone_params:
                groups.append({"params": backbone_params, "lr": lr})
        return torch.optim.AdamW(groups, weight_decay=float(self.weight_decay))

    def _train(self, timgs, tyk, vimgs, vyk, tpaths, vpaths, on_epoch_end) -> None:
        """The phases, each a :class:`TrainingLoop` (fresh early stopping and LR plateau per
        phase; one history and one :class:`BestWeights` over both), resumed from a checkpoint."""
        net = self.net_
        self._fingerprint_ = self._fingerprint(tpaths, tyk, vpaths, vyk)
        self.stopped_early_ = False
        lp = self.head_init == "lp"  # the probe replaces the head phase
        phases = [("head", 0 if lp else int(self.head_epochs)), ("finetune", int(self.epochs))]
        if not self.unfreeze:
            # No backbone block to unfreeze: the fine-tune phase would just train the head more.
            phases = [("head", phases[0][1] + int(self.epochs))]
        data = _EpochData(timgs, tyk, vimgs, vyk)
        resume = self._read_checkpoint()
        self.lp_ = self._lp_start(data) if lp and resume is None else None
        best = BestWeights(
            lambda: {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            net.load_state_dict,
            min_delta=1e-6,
            monitor=self._monitor(),
            weights={k: v.detach().clone() for k, v in net.state_dict().items()},
        )
        if self.lp_ is not None:  # fine-tuning must beat the probe to replace it
            best.best = self.lp_[self._monitor()]
        self.resumed_from_epoch_ = 0
        if resume is not None:
            meta, tensors = resume
            net.load_state_dict(
                {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True
            )
            best.weights = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
            self.resumed_from_epoch_ = int(meta["loop"]["epoch"])
        net.to(self.device_)
        history: list[dict] = []
        epoch, user_stop = 0, []

        def user_hook(record):
            late = not self.deadline_.next_epoch_fits(record["seconds"])
            if late or (on_epoch_end is not None and on_epoch_end(record)):
                user_stop.append(record["epoch"])  # ends this phase and skips the next
                return True
            return False

        for phase, n_epochs in phases:
            if not n_epochs or (resume is not None and resume[0]["phase"] != phase):
                continue  # an empty phase, or one finished before the checkpoint
            opt = self._optimizer(phase, self._set_trainable(phase))
            loop = self._phase_loop(phase, opt, best, data, history, epoch, user_hook)
            if resume is not None:
                meta, tensors = resume
                loop.load_state_dict(meta["loop"])
                opt.load_state_dict(_optimizer_state(meta["param_groups"], tensors))
                resume = None
            loop.run(n_epochs)  # ends with the best weights so far (phase 2 starts from them)
            epoch = loop.epoch
            self.stopped_early_ = any(
                isinstance(cb, EarlyStopping) and cb.stopped_epoch for cb in loop.callbacks
            )
            if user_stop:
                break
        net.to(self.device_)
        net.eval()
        self.history_ = history
        self.best_epoch_ = best.best_epoch

    def _phase_loop(self, phase, opt, best, data, history, start_epoch, user_hook):
        """The loop of one phase: plateau, best weights, early stopping, then the hooks
        (checkpoint, progress line, the caller's ``on_epoch_end``), which see their decisions."""

        def checkpoint(record):
            if self.work_dir:
                self._save_checkpoint(phase, loop, opt, best)

        self._ema = WeightEMA(self.net_, float(self.ema)) if self.ema else None

        loop = TrainingLoop(
            lambda e: self._train_epoch(phase, e, opt, data),
            lambda e: self._validate(phase, data),
            [
                ReduceLROnPlateau(
                    opt, float(self.lr_factor), int(self.lr_patience), monitor=self._monitor()
                ),
                best,
                EarlyStopping(int(self.patience), min_delta=1e-4, monitor=self._monitor()),
                Hook(checkpoint),
                Hook(self._progress),
                Hook(user_hook),
            ],
            lr=lambda: opt.param_groups[0]["lr"],
            history=history,
            start_epoch=start_epoch,
            fields={"phase": phase},
        )
        return loop

    def _lp_start(self, data: _EpochData) -> dict:
        """LP-FT: the dense layer set to the logistic regression fitted on the frozen features
        of the training images; returns the probe's validation loss and accuracy."""
        if data.feats is None:
            data.feats = self._backbone_features(data.timgs)
        lp_init(self.net_, data.feats, data.tyk, len(self.classes_), self.lp_C, self.seed)
        return {"C": self.lp_C, **self._validate("head", data)}

    def _progress(self, r: dict) -> None:
        if self._runtime().progress:
            print(
                f"epoch {r['epoch']} [{r['phase']}] loss {r['loss']:.4f} "
                f"acc {r['accuracy']:.3f} val_loss {r['val_loss']:.4f} "
                f"val_acc {r['val_accuracy']:.3f} lr {r['lr']:.2g} ({r['seconds']:.0f} s)",
                flush=True,
            )

    def _train_epoch(self, phase: str, epoch: int, opt, data: _EpochData) -> dict:
        """One pass over the training images; shuffling, augmentation and dropout are drawn
        from seeds of (seed, epoch), so a resumed run repeats an uninterrupted one."""
        torch = torch_module()
        net, aug, bs = self.net_, self.augment_, int(self.batch_size)
        n_classes, ls = len(self.classes_), float(self.label_smoothing)
        self._set_trainable(phase)  # validation left the network in eval mode
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        torch.manual_seed(self.seed * 100_003 + epoch + 1)  # dropout
        use_cache = phase == "head" and not aug.active
        if use_cache and data.feats is None:
            data.feats = self._backbone_features(data.timgs)
        perm = torch.randperm(len(data.tyk), generator=g)
        yt_all = torch.from_numpy(data.tyk)
        tot, correct, seen = 0.0, 0, 0
        ema, rng = self._ema, np.random.default_rng(self.seed * 100_003 + epoch)
        if ema is not None:
            ema.swap_out()  # learn on the learning weights, not their average
        for i in range(0, len(perm), bs):
            if i and self.deadline_.passed():
                break  # out of time: this epoch ends here (validated, best weights kept)
            idx = perm[i : i + bs]
            yb = yt_all[idx].to(self.device_)
            if use_cache:
                inp = data.feats[idx]
            else:
                batch = data.timgs[idx.numpy()]
                inp = self._to_input(aug.batch(batch, g) if aug.active else batch)
            y2 = None
            if self.mixup:
                inp, yb, y2, lam = mixup(inp, yb, float(self.mixup), rng)
            if use_cache:
                logits = net.head(inp)
            elif phase == "head":
                with torch.no_grad():
                    f = net.backbone(inp)
                logits = net.head(f)
            else:
                logits = net(inp)
            loss_each = loss_fn(logits, yb, n_classes, ls)
            if y2 is not None:
                loss_each = lam * loss_each + (1 - lam) * loss_fn(logits, y2, n_classes, ls)
            opt.zero_grad(set_to_none=True)
            loss_each.mean().backward()
            opt.step()
            if ema is not None:
                ema.update()
            tot += float(loss_each.detach().sum())
            pred = (logits[:, 0] > 0).long() if n_classes == 2 else logits.argmax(1)
            correct += int((pred == yb).sum())
            seen += len(idx)
        if ema is not None:
            ema.swap_in()  # validation, best weights and checkpoints see the average
        return {"loss": tot / max(seen, 1), "accuracy": correct / max(seen, 1)}

    def _validate(self, phase: str, data: _EpochData) -> dict:
        """Validation loss and accuracy on the original view (what early stopping and the LR
        schedule see); the head phase reuses the backbone features of the validation images."""
        torch = torch_module()
        net, bs, vyk = self.net_, int(self.batch_size), data.vyk
        n_classes = len(self.classes_)
        if phase == "head" and data.vfeats is None:
            data.vfeats = self._backbone_features(data.vimgs)
        net.eval()
        with torch.inference_mode():
            if phase == "head":
                parts = [net.head(data.vfeats[i : i + bs]) for i in range(0, len(vyk), bs)]
            else:
                parts = [
                    net(self._to_input(data.vimgs[i : i + bs])) for i in range(0, len(vyk), bs)
                ]
            vlog = torch.cat(parts)
            vy_t = torch.from_numpy(vyk).to(self.device_)
            vloss = float(loss_fn(vlog, vy_t, n_classes).mean())
            vpred = (vlog[:, 0] > 0).long() if n_classes == 2 else vlog.argmax(1)
            vacc = float((vpred == vy_t).float().mean())
        out = {"val_loss": vloss, "val_accuracy": vacc}
        if self._monitor() == "val_loss_cal":
            out["val_loss_cal"] = calibrated_loss(logits_to_proba(vlog, n_classes), vyk)
        return out

    def _monitor(self) -> str:
        """What early stopping, the LR plateau and the best weights watch: LP-FT compares
        fine-tuned weights with the probe after each one's own best temperature (the model is
        temperature-calibrated in the end; a raw loss would favour the cautious probe)."""
        return "val_loss_cal" if self.head_init == "lp" else "val_loss"

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


class _EpochData:
    """Training and validation images of one fit, and the backbone features the head phase
    computes once (training features only without augmentation)."""

    def __init__(self, timgs, tyk, vimgs, vyk):
        self.timgs, self.tyk, self.vimgs, self.vyk = timgs, tyk, vimgs, vyk
        self.feats = self.vfeats = None
