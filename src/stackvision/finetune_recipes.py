"""Fine-tuning recipes beyond the two phases of :mod:`.finetune_train`, each switched by one
parameter of :class:`~stackvision.finetune.FineTunedClassifier`:

* ``head_init="lp"`` (LP-FT, Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"):
  :func:`lp_init` fits a logistic regression (``lp_C``) on the frozen backbone's features of the
  training images and writes it into the dense layer, so fine-tuning starts exactly where the
  linear probe ends (the network's predictions before the first step are the probe's) and the
  backbone is not pulled around by gradients of a random head. It replaces the head phase.
  Fine-tuned weights replace the probe only if they beat it on the validation loss after each
  one's best temperature (:func:`calibrated_loss`), which is what the calibrated model will see.
* ``lr_decay`` < 1: :func:`decayed_groups`, layer-wise learning-rate decay: the dense layer learns
  at ``finetune_lr``, the top unfrozen block at ``finetune_lr * lr_decay``, the next one down at
  ``* lr_decay**2``... (low layers hold generic features and move least).
* ``ema`` > 0: :class:`WeightEMA`, an exponential moving average of the learning weights;
  validation, the best-weights snapshot, checkpoints and the saved model use the average.
* ``mixup`` > 0: :func:`mixup`, each batch is blended with a shuffled copy of itself (weight
  drawn from Beta(alpha, alpha)) and the loss with both labels (Zhang et al. 2018).
* ``time_limit``: :class:`Deadline`, training stops cleanly when the next epoch would not fit
  (or, mid-epoch, once the limit is reached); the best weights so far are kept.
"""

from __future__ import annotations

import time

import numpy as np

from .finetune_net import backbone_blocks, torch_module


# ---------------------------------------------------------------------- LP-FT
def lp_init(net, feats, y: np.ndarray, n_classes: int, C: float, seed: int = 0):
    """Fit :class:`~stackvision.heads.LogRegHead` (``C``) on backbone features ``feats`` (torch,
    N x D) with labels ``y``, and set ``net.fc`` to compute the same logits (the head's
    standardisation folded into the weights; for two classes the single sigmoid output is the
    difference of the two logits). Returns the fitted head."""
    from .heads import LogRegHead

    torch = torch_module()
    X = feats.detach().cpu().numpy().astype(np.float32)
    head = LogRegHead(C=float(C), max_iter=200).fit(X, y, n_classes, seed=seed)
    W = head.coef_ / head.scale_[None, :]  # (C, D) on raw features
    b = head.intercept_ - W @ head.mean_
    if n_classes == 2:
        W, b = (W[1] - W[0])[None, :], np.asarray([b[1] - b[0]])
    fc = net.fc
    with torch.no_grad():
        fc.weight.copy_(torch.as_tensor(W, dtype=fc.weight.dtype))
        fc.bias.copy_(torch.as_tensor(b, dtype=fc.bias.dtype))
    return head


def calibrated_loss(proba, y: np.ndarray) -> float:
    """Log loss of probabilities (torch, N x C) after the temperature that suits them best."""
    from .metrics import log_loss
    from .validation import apply_temperature, fit_temperature

    p = proba.double().cpu().numpy()
    return log_loss(y, apply_temperature(p, fit_temperature(p, y)))


# ---------------------------------------------------------------------- layer-wise lr decay
def decayed_groups(net, trainable: list, lr: float, decay: float) -> list[dict]:
    """Optimiser param groups: the dense layer at ``lr``, then each trainable backbone module
    from the top down at ``lr * decay**depth`` (depth 1: the first module with learning
    parameters after the blocks, and so on down). Parameters outside the blocks and the modules
    after them (the stem) get the lowest rate."""
    blocks, tail = backbone_blocks(net.backbone)
    wanted = {id(p) for p in trainable}
    groups = [{"params": list(net.fc.parameters()), "lr": float(lr)}]
    placed: set[int] = set()
    for module in [*tail[::-1], *blocks[::-1]]:
        ps = [p for p in module.parameters() if id(p) in wanted and id(p) not in placed]
        placed.update(id(p) for p in ps)
        if ps:
            groups.append({"params": ps, "lr": groups[-1]["lr"] * float(decay)})
    rest = [p for p in trainable if id(p) not in placed]
    if rest:
        groups.append({"params": rest, "lr": groups[-1]["lr"] * float(decay)})
    return groups


# ---------------------------------------------------------------------- EMA
class WeightEMA:
    """Exponential moving average of the parameters that learn (``decay``, warmed up as
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs are not stuck at the
    starting weights). :meth:`swap_in` puts the average into the network (keeping the learning
    weights aside), :meth:`swap_out` puts the learning weights back."""

    def __init__(self, net, decay: float):
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates, self.kept = float(decay), 0, None

    def update(self) -> None:
        torch = torch_module()
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                s.mul_(d).add_(p.detach(), alpha=1 - d)

    def swap_in(self) -> None:
        if self.kept is None:
            torch = torch_module()
            self.kept = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params):
                    p.copy_(s)

    def swap_out(self) -> None:
        if self.kept is not None:
            torch = torch_module()
            with torch.no_grad():
                for k, p in zip(self.kept, self.params):
                    p.copy_(k)
            self.kept = None


# ---------------------------------------------------------------------- mixup
def mixup(x, y, alpha: float, rng: np.random.Generator):
    """(mixed inputs, labels, shuffled labels, lam): ``lam * x + (1 - lam) * x[perm]``; the
    loss is ``lam * loss(y) + (1 - lam) * loss(y[perm])``."""
    torch = torch_module()
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(y))).to(y.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


# ---------------------------------------------------------------------- deadline
class Deadline:
    """A time limit in seconds from construction (None: none). :meth:`next_epoch_fits` is what
    the epoch hook asks (the last epoch's duration predicts the next), :meth:`passed` what the
    batch loop asks."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + float(seconds)
        self.hit = False

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def passed(self) -> bool:
        if self.end is not None and time.monotonic() >= self.end:
            self.hit = True
        return self.hit

    def next_epoch_fits(self, last_epoch_seconds: float) -> bool:
        if self.end is not None and self.left() < float(last_epoch_seconds):
            self.hit = True
        return not self.hit
