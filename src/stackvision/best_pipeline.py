"""``train --preset best``: the feature stack, then LP-FT fine-tuned members and a ``best``
ensemble, as much as fits in a time limit, with an honest protocol.

Protocol (every score is on images that were not used to fit what is scored):

1. **Stack** on every training image (k-fold, flip TTA): its scores are out-of-fold. When it is
   the default stack, the same stack at larger inputs (``fine-grained-large``, :data:`LARGER_INPUTS`)
   is trained the same way as a second member (scored out-of-fold too).
2. A stratified **hold-out H** (``holdout``, default 20% of the training images, identical files
   on one side) is set aside. Each **fine-tuned member** (LP-FT, :data:`FT_RECIPE`) trains on the
   other images only (its early stopping on a split of those), and never sees H.
3. The **ensemble** (``best``: each member alone, mean, weighted, calibrated; never below the best
   member) is chosen and scored out-of-fold on H, from the stack's out-of-fold probabilities on H
   and the members' predictions on H. The kept combiner is then refitted on all of H.
   With the two stacks, their own ``best`` combination is first chosen and fitted on their
   out-of-fold rows outside H (four times as many rows as H) and scored on H; it is the model
   unless the ensemble with fine-tuned members scores a lower log loss on H.

Budget: the stack runs first (it is what every preset makes); the larger-input stack starts only
if its cost, measured on a sample of the images (:func:`_large_stack_need`), fits in what is left;
then each fine-tuned member starts
only if its estimated cost (decoding, the probe's features, :data:`MIN_EPOCHS` epochs, its
predictions) fits in what is left, less a reserve for the ensemble and saving, and it gets the
rest as its own time limit (it stops cleanly, keeping its best weights). What does not fit is
skipped and said. The result is a normal model directory: the ensemble, or the stack alone when
no member was trained or the ensemble chose the stack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backbones import DEFAULT_STACK, FINE_GRAINED_LARGE
from .metrics import classification_metrics, summary_row
from .readout import stack_label

#: the fine-tuning recipe of the members (see docs/finetune.md and BENCHMARKS.md)
FT_RECIPE = {
    "head_init": "lp",
    "unfreeze": 2,
    "epochs": 8,
    "finetune_lr": 1e-4,
    "patience": 2,
    "batch_size": 32,
    "ema": 0.99,  # each of these two was the best single addition to LP-FT on flowers5
    "augment": "standard",
}
#: (backbone, input size or None for its own) fine-tuned in this order while time is left; a
#: smaller input is the fallback when the backbone's own does not fit (about half the cost)
FT_MEMBERS = (("lite0", None), ("lite0", 160), ("lite1", None))
MIN_EPOCHS = 1
#: stack -> the second stack, its readout at larger inputs. Alone it gained on cub86 and imagewoof
#: and lost on flowers5; as a member of the 'best' ensemble it gained on the first two and the
#: selection kept the default stack alone on flowers5 (BENCHMARKS.md, "Larger inputs")
LARGER_INPUTS = {DEFAULT_STACK: FINE_GRAINED_LARGE}
#: images extracted to build the large stack's engines, then to time it
PROBE_WARM, PROBE_TIMED = 8, 32
#: seconds kept for the ensemble and writing the model (plus 2% of the limit)
RESERVE_S = 20.0


@dataclass
class Step:
    """One row of the "what each step bought" table."""

    step: str
    seconds: float
    scored_on: str
    metrics: dict | None = None
    note: str = ""

    def row(self) -> dict:
        m = summary_row(self.metrics) if self.metrics else {}
        return {"step": self.step, "seconds": round(self.seconds, 1),
                "scored on": self.scored_on, **m, "note": self.note}  # fmt: skip


@dataclass
class BestResult:
    model: object
    steps: list[Step] = field(default_factory=list)
    protocol: str = ""


def _speed(backbone: str, weights, input_size: int | None, batch: int = 8) -> tuple[float, float]:
    """(training, inference) images per second of fine-tuning ``backbone`` with the recipe's
    top blocks learning, on this machine now, measured on one random batch (after a warm-up)."""
    import torch

    from .backbones import build_model, resolve
    from .finetune_net import backbone_blocks, build_net

    spec = resolve(backbone, weights)
    size = input_size or spec.preprocess.input_size
    net = build_net(build_model(spec), 10, 0.0)
    blocks, tail = backbone_blocks(net.backbone)
    net.backbone.requires_grad_(False)
    for m in blocks[-int(FT_RECIPE["unfreeze"]) :] + tail:
        m.requires_grad_(True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    rates = []
    for train in (True, False):
        net.train(train)
        for _ in range(2):
            t0 = time.perf_counter()
            if train:
                net(x).sum().backward()
            else:
                with torch.inference_mode():
                    net(x)
            dt = time.perf_counter() - t0
        rates.append(batch / max(dt, 1e-6))
    return rates[0], rates[1]


def _large_stack_need(large, paths: list[str], fit_seconds: float) -> tuple[float, float]:
    """(seconds the larger-input stack would still need, seconds this estimate took): its
    features extracted for a few images (building its engines), then timed on the next ones,
    which also says how many the cache already holds; plus the first stack's head fitting."""
    t0 = time.monotonic()
    step = max(1, len(paths) // (PROBE_WARM + PROBE_TIMED))
    sample = paths[::step][: PROBE_WARM + PROBE_TIMED]
    large.features(sample[:PROBE_WARM])
    timed = sample[PROBE_WARM:]
    stats = large.features(timed).stats if timed else {}
    n_new = stats.get("n_computed", 0)
    per_image = stats.get("compute_seconds", 0.0) / max(n_new, 1)
    per_image *= 1 + large.train_views / large.n_views_  # fit extracts the training views too
    left = max(len(paths) - len(sample), 0) * (n_new / max(len(timed), 1))
    return 1.1 * left * per_image + 1.2 * fit_seconds, time.monotonic() - t0


def _oof_rows(model, paths: list[str]) -> np.ndarray | None:
    """A stack's out-of-fold probabilities on ``paths``, or None if it lacks one of them."""
    opaths, _, oproba = model.eval_
    where = {p: i for i, p in enumerate(opaths)}
    if any(p not in where for p in paths):
        return None
    return oproba[[where[p] for p in paths]]


def _fit_ensemble(members, names, paths, P: np.ndarray, y: np.ndarray, seed, runtime):
    """A ``best`` ensemble of the fitted ``members`` (named ``names``), chosen, scored
    out-of-fold and fitted on the rows ``paths`` with the members' probabilities ``P``."""
    from .duplicates import content_groups
    from .ensemble import EnsembleClassifier
    from .ensemble_combiners import fit_combiners

    ens = EnsembleClassifier(members, method="best", folds=5, seed=seed, runtime=runtime)
    ens._validate_params()
    ens._load_members()
    ens.member_names_ = names
    fit_combiners(ens, paths, P, y, content_groups(paths))
    ens.problems_, ens.manifest_ = list(members[0].problems_), None
    # the rows are the stack's own training images, which its record already holds
    ens.training_hashes_ = ens._fitted_on(())
    return ens


def _stack_pair(members, P_all, oy, opaths, hold, seed, runtime):
    """The two stacks' ``best`` ensemble, chosen and fitted on the out-of-fold rows outside H
    (four times H's rows: a steadier choice than H alone), and its probabilities on H."""
    from .ensemble_methods import apply_method

    rest = np.setdiff1d(np.arange(len(opaths)), hold)
    pair = _fit_ensemble(members, ["stack", "stack-large"], [opaths[i] for i in rest],
                         P_all[:, rest], oy[rest], seed, runtime)  # fmt: skip
    return pair, apply_method(pair.method_, P_all[:, hold], pair.fitted_.get(pair.method_))


def _result(ens, steps, protocol: str, alone: str, tail: str = "") -> BestResult:
    """The model ``ens`` stands for: the stack its selection kept alone (``protocol`` + ``alone``
    + its name), else the ensemble itself (``protocol`` + ``tail``)."""
    pick = ens.selection_.name
    name = pick[len("member:") :] if pick.startswith("member:") else ""
    model = ens.members_[ens.member_names_.index(name)] if name.startswith("stack") else ens
    text = protocol + (f"{alone} {name} alone." if model is not ens else tail)
    model.metrics_["protocol"] = text
    return BestResult(model, steps, text)


def fit_best(
    paths: list[str],
    labels: list[str],
    *,
    stack_params: dict,
    time_limit: float,
    runtime,
    weights: dict | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    say=print,
    started: float | None = None,
    ft_members: tuple | None = None,
) -> BestResult:
    """Run the pipeline (see the module doc) on ``paths``/``labels``. ``stack_params``: the
    :class:`~stackvision.classifier.StackedClassifier` parameters (backbones, head, folds...).
    ``started``: ``time.monotonic()`` when the command began (default: now). ``ft_members``:
    the (backbone, input size) pairs to fine-tune, in order (default :data:`FT_MEMBERS`; ``()``:
    the stacks only)."""
    from .classifier import StackedClassifier
    from .duplicates import content_groups
    from .finetune import FineTunedClassifier
    from .validation import holdout_split

    t_start = time.monotonic() if started is None else started
    end = t_start + float(time_limit)
    reserve = RESERVE_S + 0.02 * float(time_limit)
    steps: list[Step] = []

    # 1. the stack, on every image, scored out-of-fold
    t0 = time.monotonic()
    stack = StackedClassifier(**stack_params, weights=weights, seed=seed, runtime=runtime)
    stack.fit(paths, labels)
    t_stack = time.monotonic() - t0
    steps.append(Step(f"stack {stack_label(s.name for s in stack.specs_)}", t_stack,
                      "all (CV)", stack.metrics_, f"{stack.folds}-fold out-of-fold"))  # fmt: skip
    opaths, oy, oproba = stack.eval_
    classes = list(stack.classes_)

    # 2. the hold-out H, and fine-tuned members on the rest
    hold = holdout_split(oy, holdout, seed, content_groups(opaths))[1]
    hset = set(hold.tolist())
    h_paths = [opaths[i] for i in hold]
    h_y = oy[hold]
    t_paths = [p for i, p in enumerate(opaths) if i not in hset]
    t_labels = [classes[oy[i]] for i in range(len(opaths)) if i not in hset]
    on_h = "H"
    steps.append(Step("stack, on H", 0.0, on_h, classification_metrics(h_y, oproba[hold], classes),
                      "out-of-fold rows of H"))  # fmt: skip
    members, P, names = [stack], [oproba[hold]], ["stack"]
    p_all = None  # the larger-input stack's out-of-fold probabilities, rows as opaths
    counts = np.bincount(h_y, minlength=len(classes))
    # the combiners are fitted and scored k-fold on H: at least 2 images of every class there
    larger = LARGER_INPUTS.get(tuple(stack._backbone_names()))
    if counts.min() >= 2 and larger and stack.precision_ == "int8":  # the probe needs fp32/bf16
        steps.append(Step(f"+ stack {stack_label(larger)}", 0.0, "-", None,
                          "skipped: int8 (its cost probe would calibrate on a few images)"))  # fmt: skip
    elif counts.min() >= 2 and larger:
        label = f"+ stack {stack_label(larger)}"
        t0 = time.monotonic()
        large = StackedClassifier(**{**stack_params, "backbones": list(larger)},
                                  weights=weights, seed=seed, runtime=runtime)  # fmt: skip
        left = end - time.monotonic() - reserve
        fit_s = t_stack - stack.extract_stats_["seconds"]
        # not even its head fitting fits: skip without the probe (which builds engines)
        need, probe_s = (1.2 * fit_s, 0.0) if left < 1.2 * fit_s else _large_stack_need(
            large, paths, fit_s)  # fmt: skip
        if need > left - probe_s:
            steps.append(Step(label, time.monotonic() - t0, "-", None,
                              f"skipped: needs ~{need:.0f} s, {max(left - probe_s, 0):.0f} s left"))  # fmt: skip
        else:
            say(f"training the stack at larger inputs ({', '.join(larger)}) ...")
            large.fit(paths, labels)
            p_all = _oof_rows(large, opaths)
            p_h = None if p_all is None else p_all[hold]
            if p_h is None:
                steps.append(Step(label, time.monotonic() - t0, "-", None,
                                  "left out: could not read every hold-out image"))  # fmt: skip
            else:
                members.append(large)
                P.append(p_h)
                names.append("stack-large")
                steps.append(Step(label, time.monotonic() - t0, on_h,
                                  classification_metrics(h_y, p_h, classes),
                                  f"{large.folds}-fold out-of-fold rows of H"))  # fmt: skip
    ft_members = FT_MEMBERS if ft_members is None else ft_members
    for bb, size in ft_members if counts.min() >= 2 else ():
        if any(getattr(m, "spec_", None) and m.spec_.name == bb for m in members):
            continue  # this backbone is a member already (at another size)
        bb_name = bb + (f"@{size}px" if size else "")
        left = end - time.monotonic() - reserve
        t0 = time.monotonic()
        if left <= 0:
            steps.append(Step(f"+ LP-FT {bb_name}", 0.0, "-", None, "skipped: no time left"))
            continue
        train_ips, infer_ips = _speed(bb, weights, size)
        n_t, n_h = len(t_paths), len(h_paths)
        predict = (2 * n_h + 2 * 0.15 * n_t) / infer_ips  # H and the member's own calibration
        need = n_t / infer_ips + MIN_EPOCHS * (0.85 * n_t / train_ips) + predict
        need += time.monotonic() - t0
        if need > left:
            steps.append(Step(f"+ LP-FT {bb_name}", time.monotonic() - t0, "-", None,
                              f"skipped: needs ~{need:.0f} s, {max(left, 0):.0f} s left"))  # fmt: skip
            continue
        say(f"fine-tuning {bb_name} (LP-FT) on {n_t} images, up to {left - predict:.0f} s ...")
        ft = FineTunedClassifier(
            bb, **FT_RECIPE, time_limit=max(left - predict - (time.monotonic() - t0), 1.0),
            input_size=size, weights=weights, seed=seed, runtime=runtime,
        )  # fmt: skip
        ft.fit(t_paths, t_labels)
        pred = ft.predict_paths(h_paths)
        if len(pred.paths) != len(h_paths):  # a member must score every row of H
            steps.append(Step(f"+ LP-FT {bb_name}", time.monotonic() - t0, "-", None,
                              "left out: could not read every hold-out image"))  # fmt: skip
            continue
        cols = [list(ft.classes_).index(c) for c in classes]
        P.append(pred.proba[:, cols])
        members.append(ft)
        names.append(f"ft-{ft.spec_.name}-{ft.preprocess_.input_size}px")
        note = f"{len(ft.history_)} epoch(s), best {ft.best_epoch_}" + (
            ", stopped by the time limit" if ft.deadline_.hit else ""
        )
        steps.append(Step(f"+ LP-FT {bb_name}", time.monotonic() - t0, on_h,
                          classification_metrics(h_y, P[-1], classes), note))  # fmt: skip

    if counts.min() < 2:
        steps.append(Step("+ second stack and LP-FT members", 0.0, "-", None,
                          "skipped: too few images per class for a hold-out (fewer than 10)"))  # fmt: skip
    protocol = (
        f"Protocol: the stack was scored out-of-fold ({stack.folds}-fold) on all training images. "
        f"A stratified hold-out H of {len(h_paths)} training images (seed {seed}) was set aside; "
        "fine-tuned members trained on the other images only. The ensemble was chosen and scored "
        "out-of-fold on H (the stacks' probabilities on H are their out-of-fold ones). No score "
        "was computed on images used to fit what is scored."
    )
    if len(members) == 1:
        stack.metrics_["protocol"] = text = (
            protocol + " No other member fitted: the model is the stack."
        )
        return BestResult(stack, steps, text)

    from .ensemble_methods import as_array

    # 3a. the two stacks combined on their out-of-fold rows outside H, scored on H
    pair = None
    if p_all is not None and names[:2] == ["stack", "stack-large"]:
        t0 = time.monotonic()
        P_all = as_array([oproba, p_all])
        pair, p_pair = _stack_pair(members[:2], P_all, oy, opaths, hold, seed, runtime)
        pick = pair.selection_.name
        m_pair = classification_metrics(h_y, p_pair, classes)
        steps.append(Step(f"+ both stacks, best ({pick})", time.monotonic() - t0, on_h, m_pair,
                          f"chosen out-of-fold on the {len(opaths) - len(hold)} images outside H"))  # fmt: skip
        protocol += (
            " The two stacks' combination was chosen and fitted on their out-of-fold rows "
            "outside H, and scored on H."
        )
        both = f" The model is both stacks ({pick})."
        if len(members) == 2:  # no fine-tuned member: the pair is the model
            return _result(pair, steps, protocol, " The model is", both)

    # 3b. the ensemble of every member, chosen and scored out-of-fold on H
    t0 = time.monotonic()
    ens = _fit_ensemble(members, names, h_paths, as_array(P), h_y, seed, runtime)
    chosen = ens.selection_.name
    steps.append(Step(f"+ ensemble best ({chosen})", time.monotonic() - t0, on_h, ens.metrics_,
                      f"{len(ens.metrics_.get('folds') or []) or 5}-fold out-of-fold on H"))  # fmt: skip
    if pair is not None and m_pair["log_loss"] <= ens.metrics_["log_loss"]:
        protocol += (
            " The stacks' combination scored better on H than the ensemble with the fine-tuned "
            "members."
        )
        return _result(pair, steps, protocol, " The model is", both)
    return _result(ens, steps, protocol, " The ensemble chose")
