"""One contract for every model kind (:class:`stackvision.base.ModelBase`), checked the same way on
each: a feature stack with a logistic-regression head, one with an MLP head, a fine-tuned network,
and an ensemble of a stack and a fine-tuned network.

Each model is fitted once for the module (lite0 only, 3 flower classes x 10 images, one epoch for
the fine-tuned network, features from the session cache) and then: saved and loaded (same
probabilities), exported to ONNX and run in ONNX Runtime alone (matches ``forward_uint8``), used
as an ensemble member, cloned, its parameters read and set, left unchanged by ``fit``, unknown or
invalid parameters refused, and scikit-learn's estimator checks that apply to image-path models.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import replace

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks as sk

from stackvision import Runtime, StackedClassifier, load_model
from stackvision.base import ModelBase
from stackvision.data import from_folder
from stackvision.ensemble import EnsembleClassifier
from stackvision.errors import StackvisionError
from stackvision.export import export_model, prepare_images
from stackvision.finetune import FineTunedClassifier
from stackvision.params import InvalidParameter, UnknownParameter

from .conftest import FLOWERS, make_slice
from .serving_helpers import run_onnx_alone

pytest.importorskip("onnxruntime")

CLASSES = ["daisy", "sunflower", "tulip"]
KINDS = ["stack-logreg", "stack-mlp", "finetune", "ensemble"]


def _new(kind: str, rt: Runtime, member_dirs=None) -> ModelBase:
    """An unfitted model of ``kind``; parameters given in forms ``fit`` must keep as they are
    (a backbone string, a head-params dict, an unfreeze count, a tuple of members)."""
    if kind == "stack-logreg":
        return StackedClassifier("lite0", folds=2, runtime=rt)
    if kind == "stack-mlp":
        hp = {"hidden": 16, "epochs": 3, "patience": 1}
        return StackedClassifier(["lite0"], head="mlp", head_params=hp, folds=0, val_split=0.3,
                                 tta="none", runtime=rt)  # fmt: skip
    if kind == "finetune":
        return FineTunedClassifier("lite0", head_epochs=0, epochs=1, unfreeze=1, input_size=64,
                                   batch_size=8, val_split=0.3, runtime=rt)  # fmt: skip
    return EnsembleClassifier(tuple(member_dirs), method="stacked", folds=2, runtime=rt)


@pytest.fixture(scope="module")
def rt(cache_dir) -> Runtime:
    return Runtime(cache_dir=cache_dir, device="cpu")


@pytest.fixture(scope="module")
def train(flowers_small):
    listing = from_folder(str(flowers_small))
    return listing.paths, listing.labels


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """3 flower classes x 4 images none of the models was trained on (the ensemble's data)."""
    d = make_slice(tmp_path_factory.mktemp("contract-heldout"), FLOWERS, CLASSES, 4, offset=10)
    listing = from_folder(str(d))
    return listing.paths, listing.labels


@pytest.fixture(scope="module")
def heldout2(tmp_path_factory):
    """3 x 4 more images that no model, the ensemble included, was fitted on."""
    d = make_slice(tmp_path_factory.mktemp("contract-heldout2"), FLOWERS, CLASSES, 4, offset=14)
    listing = from_folder(str(d))
    return listing.paths, listing.labels


@pytest.fixture(scope="module")
def built(train, heldout, rt, tmp_path_factory):
    """kind -> (fitted model, deep copy of its parameters before fit, the parameter objects)."""
    root = tmp_path_factory.mktemp("contract-members")
    out = {}
    for kind in KINDS:
        if kind == "ensemble":
            dirs = [
                out[k][0].save(str(root / k), report=False) for k in ("stack-logreg", "finetune")
            ]
            model, (X, y) = _new(kind, rt, dirs), heldout
        else:
            model, (X, y) = _new(kind, rt), train
        params = model.get_params(deep=False)
        before = copy.deepcopy(params)
        assert model.fit(X, y) is model
        out[kind] = (model, before, params)
    return out


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


def test_save_load_gives_the_same_probabilities(kind, built, heldout, rt, tmp_path):
    model = built[kind][0]
    X = heldout[0][::2]
    path = model.save(str(tmp_path / "m"), report=False)
    again = load_model(path, rt)
    assert type(again) is type(model) and again.classes_ == model.classes_ == CLASSES
    np.testing.assert_allclose(again.predict_proba(X), model.predict_proba(X), atol=1e-6, rtol=0)
    desc = again.describe()
    assert desc["kind"] == model.kind and desc["classes"] == CLASSES
    assert [b["name"] for b in desc["backbones"]] and {b["name"] for b in desc["backbones"]} == {
        "lite0"
    }
    # A loaded model runs with the runtime it is given, and saves again.
    assert again.runtime == rt
    assert load_model(again.save(str(tmp_path / "again"), report=False), rt).classes_ == CLASSES


def test_onnx_in_onnxruntime_alone_matches_forward_uint8(kind, built, heldout, tmp_path):
    model = built[kind][0]
    info = export_model(model, str(tmp_path / "m.onnx"), check=False)
    pp = model.input_preprocess()
    assert info["input"]["size"] == pp.input_size == (64 if kind == "finetune" else 224)
    batch = prepare_images(heldout[0][:3], model)
    assert batch.shape == (3, pp.input_size, pp.input_size, 3) and batch.dtype == np.uint8
    proba, meta = run_onnx_alone(tmp_path / "m.onnx", batch, tmp_path)
    assert meta["loaded"] == [] and meta["classes"] == CLASSES
    want = model.forward_uint8(batch)
    assert want.shape == (3, 3)
    np.testing.assert_allclose(want.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(proba, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["stack-logreg", "finetune"])
def test_bgr_backbone_onnx_matches_forward_uint8(which, built, heldout, cache_dir, tmp_path):
    """No real backbone takes BGR pixels, so lite0 is told it does (with per-channel statistics:
    lite0's own are the same for every channel): the graph takes RGB, reverses it and normalises
    with the statistics in BGR order, exactly as forward_uint8 does."""
    stats = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "channel_order": "BGR"}
    model = copy.copy(built[which][0])
    batch = prepare_images(heldout[0][:3], model)
    rgb = model.forward_uint8(batch)
    if which == "finetune":
        model.preprocess_ = replace(model.preprocess_, **stats)
        model._setup_runtime()
    else:
        model.specs_ = [replace(s, preprocess=replace(s.preprocess, **stats)) for s in model.specs_]
        model.runtime = Runtime(cache_dir=cache_dir, device="cpu", engine="torch")
        model.__dict__.pop("_engines", None)  # the copy's own engines
    assert model.input_preprocess().channel_order == "RGB"
    export_model(model, str(tmp_path / "bgr.onnx"))  # checks the graph against the torch module
    proba, _ = run_onnx_alone(tmp_path / "bgr.onnx", batch, tmp_path)
    want = model.forward_uint8(batch)
    np.testing.assert_allclose(proba, want, atol=1e-4, rtol=0)
    assert np.abs(want - rgb).max() > 1e-3  # the channel order did change the prediction


def test_usable_as_an_ensemble_member(kind, built, heldout, heldout2):
    model = built[kind][0]
    other = built["stack-logreg" if kind == "finetune" else "finetune"][0]
    if kind == "ensemble":  # it was fitted on `heldout`: an ensemble of it is refused there
        with pytest.raises(StackvisionError, match="were used to train member 'ensemble0'"):
            EnsembleClassifier([model, other], method="mean", folds=2).fit(*heldout)
    X, y = heldout2
    ens = EnsembleClassifier([model, other], method="mean", folds=2).fit(X, y)
    assert ens.member_names_ == [f"{model.kind}0", f"{other.kind}1"]
    expect = (model.predict_proba(X) + other.predict_proba(X)) / 2
    np.testing.assert_allclose(ens.predict_proba(X), expect, atol=1e-6)
    batch = prepare_images(X[:2], ens)
    sizes = [m.input_preprocess().input_size for m in (model, other)]
    assert batch.shape[1] == max(sizes)
    assert ens.forward_uint8(batch).shape == (2, 3)


def test_clone_get_set_params_and_fit_leaves_parameters_alone(kind, built):
    model, before, given = built[kind]
    params = model.get_params(deep=False)
    # fit stored nothing in the parameters: same values, the very objects given
    assert params == before
    assert all(params[k] is v for k, v in given.items())
    names = set(params)
    public = {k for k in vars(model) if not k.startswith("_")}
    assert public - names == {k for k in public - names if k.endswith("_")}
    assert names == set(inspect.signature(type(model)).parameters)

    fresh = clone(model)
    assert type(fresh) is type(model) and fresh.get_params(deep=False) == params
    with pytest.raises(NotFittedError, match="not fitted"):
        fresh.predict(["x.jpg"])
    assert fresh.set_params(seed=7) is fresh and fresh.get_params()["seed"] == 7
    assert model.get_params()["seed"] == 0
    fresh.set_params(**params)
    assert fresh.get_params(deep=False) == params


@pytest.mark.parametrize(
    "cls, typo, right",
    [
        (StackedClassifier, "fodls", "folds"),
        (FineTunedClassifier, "epcohs", "epochs"),
        (EnsembleClassifier, "methd", "method"),
    ],
)
def test_unknown_parameter_suggests_the_close_one(cls, typo, right):
    with pytest.raises(TypeError, match=f"unknown parameter '{typo}'. did you mean '{right}'"):
        cls(**{typo: 3})
    with pytest.raises(UnknownParameter, match=f"did you mean '{right}'"):
        cls().set_params(**{typo: 3})
    # the old runtime keywords point at Runtime
    with pytest.raises(UnknownParameter, match=r"runtime option: pass runtime=Runtime\(device"):
        cls(device="cpu")


INVALID = {
    StackedClassifier: [
        ("folds", 1),
        ("folds", False),
        ("tta", "rot90"),
        ("val_split", 1.5),
        ("head", "svm"),
        ("backbones", []),
        ("seed", -1),
        ("runtime", {"device": "cpu"}),
    ],
    FineTunedClassifier: [
        ("epochs", -1),
        ("dropout", 1.0),
        ("unfreeze", "some"),
        ("input_size", 8),
        ("lr", 0),
        ("augment", "wobbly"),
        ("batch_size", 0),
    ],
    EnsembleClassifier: [("method", "median"), ("folds", 1), ("members", ["only-one"])],
}


@pytest.mark.parametrize(
    "cls, name, value", [(c, n, v) for c, cases in INVALID.items() for n, v in cases]
)
def test_invalid_values_raise_at_fit(cls, name, value, train):
    members = {"members": ["a", "b"]} if cls is EnsembleClassifier else {}
    model = cls(**{**members, name: value})  # stored as given: no error yet
    assert model.get_params()[name] is value
    with pytest.raises(InvalidParameter, match=f"{cls.__name__}: {name} must be") as exc:
        model.fit(*train)
    assert exc.value.name == name
    assert exc.value.flag(f"--{name}").problem.startswith(f"--{name} must be")


def test_runtime_is_one_checked_value():
    with pytest.raises(InvalidParameter, match="Runtime: batch_size must be an integer >= 1"):
        Runtime(batch_size=0)
    with pytest.raises(UnknownParameter, match="did you mean 'device'"):
        Runtime().replace(devcie="cpu")
    assert Runtime.of({"device": "cpu"}, batch_size=4) == Runtime(device="cpu", batch_size=4)
    assert repr(Runtime(device="cpu")) == "Runtime(device='cpu')"


# scikit-learn's checks that apply to models whose X is a list of image paths. The others build
# numeric X (check_fit_score_takes_y, check_estimators_overwrite_params,
# check_dont_overwrite_parameters, check_n_features_in_after_fitting, the dtype/NaN/sample-weight
# checks) and cannot fit these models; what the two "overwrite" checks ask is tested above on
# real fits (test_clone_get_set_params_and_fit_leaves_parameters_alone).
SKLEARN_CHECKS = [
    sk.check_estimator_cloneable,  # clone() works
    sk.check_estimator_tags_renamed,  # no old-style _more_tags
    sk.check_valid_tag_types,  # __sklearn_tags__ well formed
    sk.check_estimator_repr,  # repr() works
    sk.check_no_attributes_set_in_init,  # __init__ stores the parameters and nothing else
    sk.check_parameters_default_constructible,  # defaults are immutable, stored unchanged
    sk.check_get_params_invariance,  # get_params(deep=False) is part of deep=True
    sk.check_set_params,  # set_params stores any value; validation waits for fit
    sk.check_do_not_raise_errors_in_init_or_set_params,  # likewise for odd values
    sk.check_estimators_unfitted,  # predict/predict_proba before fit: NotFittedError
    sk.check_mixin_order,  # ClassifierMixin before BaseEstimator
]


@pytest.mark.parametrize("check", SKLEARN_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", [StackedClassifier, FineTunedClassifier, EnsembleClassifier])
def test_sklearn_estimator_checks(cls, check):
    check(cls.__name__, cls())


def test_cross_val_score_and_grid_search_on_image_paths(built, train):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score

    model = built["stack-logreg"][0]
    X, y = np.asarray(train[0]), np.asarray(train[1])
    scores = cross_val_score(model, X, y, cv=2)  # clone, fit, score on each split
    by_hand = [
        clone(model).fit(X[tr], y[tr]).score(X[te], y[te])
        for tr, te in StratifiedKFold(2).split(X, y)
    ]
    np.testing.assert_array_equal(scores, by_hand)
    assert (scores > 1 / 3).all()  # better than chance (3 classes)
    search = GridSearchCV(model, {"head_params": [{"C": 0.1}, {"C": 10.0}]}, cv=2).fit(X, y)
    assert search.best_params_["head_params"] in ({"C": 0.1}, {"C": 10.0})
    assert search.best_estimator_.predict(X[:2]).shape == (2,)


def test_the_contract_is_called_directly():
    """Export and ensembles call the contract; nothing probes models with hasattr/getattr."""
    import importlib

    names = ["base", "classifier", "ensemble", "ensemble_methods", "export", "finetune",
             "finetune_net", "finetune_train", "models", "compare", "ensemble_combiners",
             "finetune_recipes", "finetune_checkpoint", "finetune_load", "best_pipeline"]  # fmt: skip
    for mod in [importlib.import_module(f"stackvision.{n}") for n in names]:
        src = inspect.getsource(mod)
        assert "hasattr(" not in src, mod.__name__
        assert "getattr(self" not in src and "getattr(model" not in src, mod.__name__
    abstract = ModelBase.__abstractmethods__
    assert {"input_preprocess", "forward_uint8", "to_torch_module", "describe", "save"} <= abstract
