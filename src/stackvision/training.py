"""One epoch loop with callbacks, for every trained network (MLP head, streaming heads, fine-tuning).

The caller provides what is model-specific: ``train_epoch(epoch) -> dict`` (``loss``,
``accuracy``...) and ``validate(epoch) -> dict`` (``val_loss``, ``val_accuracy``...), plus
functions to read the learning rate and to snapshot/restore weights. :class:`TrainingLoop` owns
the rest, as callbacks in the manner of Keras / Ultralytics' trainer:

* :class:`EarlyStopping`: stop after more than ``patience`` epochs without a ``min_delta``
  improvement of the monitored value (``val_loss``);
* :class:`ReduceLROnPlateau`: multiply the learning rate by ``factor`` after more than
  ``patience`` epochs without a relative 1e-4 improvement (the arithmetic of
  ``torch.optim.lr_scheduler.ReduceLROnPlateau``, so results do not change, without torch);
* :class:`BestWeights`: snapshot the weights at each improvement, restore them when training ends;
* history: one dict per epoch (``epoch``, the caller's fields, ``lr``, ``seconds``);
* :class:`Hook`: a function called with each record that may return True to stop (checkpoints,
  progress lines, user hooks).

Resuming: :meth:`TrainingLoop.state_dict` is JSON-able (epoch counters, stop flag, history and
every callback's counters); weights, optimiser state and ``BestWeights.weights`` are the caller's
to save. Several phases (fine-tuning: head, then backbone) are several loops sharing one history
list and one :class:`BestWeights`, each loop starting at the previous one's ``epoch``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any


class Callback:
    """Base class: every hook is optional. ``loop.stop = True`` ends training after this epoch.

    ``_state``: the names of the numeric attributes that :meth:`state_dict` saves for resuming.
    """

    _state: tuple[str, ...] = ()

    def on_train_begin(self, loop: TrainingLoop) -> None:
        pass

    def on_epoch_end(self, loop: TrainingLoop, record: dict) -> None:
        pass

    def on_train_end(self, loop: TrainingLoop) -> None:
        pass

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._state}

    def load_state_dict(self, state: dict) -> None:
        for k in self._state:
            if k in state:  # a state saved before a counter existed keeps its initial value
                setattr(self, k, type(getattr(self, k))(state[k]))


def _monitored(record: dict, key: str) -> float:
    if key not in record:
        raise KeyError(f"the epoch record has no '{key}' to monitor (keys: {sorted(record)})")
    return float(record[key])


class EarlyStopping(Callback):
    """Stop once the monitored value has not improved by more than ``min_delta`` for more than
    ``patience`` epochs in a row (``patience=0``: stop at the first epoch without improvement)."""

    _state = ("best", "bad", "stopped_epoch")

    def __init__(self, patience: int, min_delta: float = 1e-4, monitor: str = "val_loss"):
        self.patience, self.min_delta, self.monitor = int(patience), float(min_delta), monitor
        self.best, self.bad, self.stopped_epoch = math.inf, 0, 0

    def on_epoch_end(self, loop, record):
        value = _monitored(record, self.monitor)
        if value < self.best - self.min_delta:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad > self.patience:
            self.stopped_epoch = int(record["epoch"])
            loop.stop = True


class ReduceLROnPlateau(Callback):
    """Multiply every param group's ``lr`` by ``factor`` (not below ``min_lr``) after more than
    ``patience`` epochs without improvement.

    Same rule as torch's scheduler of that name with its defaults (mode ``min``, relative
    threshold 1e-4, cooldown 0, eps 1e-8): an epoch improves if ``value < best * (1 - 1e-4)``.
    ``optimizer``: anything with ``param_groups`` (a list of dicts holding ``lr``).
    """

    _state = ("best", "bad", "cooldown_left")

    def __init__(
        self,
        optimizer,
        factor: float = 0.1,
        patience: int = 10,
        min_lr: float = 0.0,
        threshold: float = 1e-4,
        cooldown: int = 0,
        monitor: str = "val_loss",
    ):
        if not factor < 1.0:
            raise ValueError(f"factor must be < 1, got {factor}")
        self.optimizer, self.factor, self.patience = optimizer, float(factor), int(patience)
        self.min_lr, self.threshold, self.cooldown = float(min_lr), float(threshold), int(cooldown)
        self.monitor, self.eps = monitor, 1e-8
        self.best, self.bad, self.cooldown_left = math.inf, 0, 0

    def on_epoch_end(self, loop, record):
        value = _monitored(record, self.monitor)
        if value < self.best * (1.0 - self.threshold):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad = 0
        if self.bad > self.patience:
            for group in self.optimizer.param_groups:
                old = float(group["lr"])
                new = max(old * self.factor, self.min_lr)
                if old - new > self.eps:
                    if hasattr(group["lr"], "fill_"):  # a tensor lr (torch allows it)
                        group["lr"].fill_(new)
                    else:
                        group["lr"] = new
            self.cooldown_left, self.bad = self.cooldown, 0


class BestWeights(Callback):
    """Keep ``snapshot()`` of the epoch with the best monitored value (improvement: more than
    ``min_delta``); ``restore(weights)`` it when training ends (if ``restore_on_end``).

    ``weights`` may be preset (e.g. the starting weights, or the ones read from a checkpoint).
    ``best_epoch`` is the 1-based epoch of the kept weights (0: none kept yet).
    """

    _state = ("best", "best_epoch")

    def __init__(
        self,
        snapshot: Callable[[], Any],
        restore: Callable[[Any], None],
        min_delta: float = 0.0,
        monitor: str = "val_loss",
        restore_on_end: bool = True,
        weights: Any = None,
    ):
        self.snapshot, self.restore, self.min_delta = snapshot, restore, float(min_delta)
        self.monitor, self.restore_on_end = monitor, restore_on_end
        self.best, self.best_epoch, self.weights = math.inf, 0, weights

    def on_epoch_end(self, loop, record):
        value = _monitored(record, self.monitor)
        if value < self.best - self.min_delta:
            self.best, self.best_epoch = value, int(record["epoch"])
            self.weights = self.snapshot()

    def on_train_end(self, loop):
        if self.restore_on_end and self.weights is not None:
            self.restore(self.weights)


class Hook(Callback):
    """Calls ``fn(record)`` after each epoch; a truthy return value stops training."""

    def __init__(self, fn: Callable[[dict], Any]):
        self.fn = fn

    def on_epoch_end(self, loop, record):
        if self.fn(record):
            loop.stop = True


class TrainingLoop:
    """Runs ``train_epoch`` then ``validate`` each epoch, records history, runs the callbacks.

    ``lr``: returns the learning rate to record (read before the epoch's callbacks, so a
    plateau reduction shows from the next epoch). ``history``: a list to append to (shared by
    the loops of several phases). ``start_epoch``: 0-based index of the first epoch (phases after
    the first start where the previous one ended). ``fields``: constant entries of each record
    (e.g. ``{"phase": "head"}``). Callbacks run in the given order; put checkpoint and progress
    hooks last so they see the other callbacks' decisions.
    """

    def __init__(
        self,
        train_epoch: Callable[[int], dict],
        validate: Callable[[int], dict],
        callbacks: Sequence[Callback] = (),
        *,
        lr: Callable[[], float] | None = None,
        history: list[dict] | None = None,
        start_epoch: int = 0,
        fields: dict | None = None,
    ):
        self.train_epoch, self.validate = train_epoch, validate
        self.callbacks = list(callbacks)
        self.lr = lr
        self.history = [] if history is None else history
        self.epoch = int(start_epoch)  # 0-based index of the next epoch
        self.done = 0  # epochs this loop has run (a resumed loop counts the earlier ones)
        self.fields = dict(fields or {})
        self.stop = False

    def run(self, epochs: int) -> list[dict]:
        """Train until this loop has run ``epochs`` epochs or a callback stops it; then the
        callbacks' ``on_train_end`` (best weights restored). Returns the history."""
        for cb in self.callbacks:
            cb.on_train_begin(self)
        while not self.stop and self.done < int(epochs):
            t0 = time.perf_counter()
            record = {"epoch": self.epoch + 1, **self.fields}
            record.update(self.train_epoch(self.epoch))
            record.update(self.validate(self.epoch))
            if self.lr is not None:
                record["lr"] = self.lr()
            record["seconds"] = round(time.perf_counter() - t0, 2)
            self.history.append(record)
            self.epoch += 1
            self.done += 1
            for cb in self.callbacks:
                cb.on_epoch_end(self, record)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """JSON-able loop state (``inf`` is written as ``Infinity`` by :mod:`json`)."""
        return {
            "epoch": self.epoch,
            "done": self.done,
            "stop": self.stop,
            "history": [dict(r) for r in self.history],
            "callbacks": [[type(cb).__name__, cb.state_dict()] for cb in self.callbacks],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of a loop with the same callbacks (in order)."""
        saved = state.get("callbacks", [])
        names = [type(cb).__name__ for cb in self.callbacks]
        if [n for n, _ in saved] != names:
            raise ValueError(f"saved callbacks {[n for n, _ in saved]} differ from {names}")
        self.epoch, self.done = int(state["epoch"]), int(state["done"])
        self.stop = bool(state["stop"])
        self.history[:] = [dict(r) for r in state["history"]]
        for cb, (_, st) in zip(self.callbacks, saved):
            cb.load_state_dict(st)
