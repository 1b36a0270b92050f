"""Loading validates the model directory: a damaged or inconsistent copy of each kind (stack,
finetune, ensemble) makes ``stackvision predict`` print one ``error:`` line and exit 2, never a
traceback and never wrong probabilities; an undamaged copy still predicts."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from stackvision import StackedClassifier, load_model
from stackvision.data import from_folder
from stackvision.ensemble import EnsembleClassifier
from stackvision.errors import StackvisionError
from stackvision.finetune import FineTunedClassifier
from stackvision.model_tensors import validate_tensors
from stackvision.runtime import Runtime

from .conftest import FLOWERS, ROOT, make_slice
from .test_cli import run_cli

CLASSES = ["daisy", "sunflower", "tulip"]


@pytest.fixture(autouse=True)
def _this_tree(monkeypatch):
    """run_cli's subprocess imports stackvision from this checkout, whatever is installed."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    )


@pytest.fixture(scope="module")
def models(flowers_small, cache_dir, tmp_path_factory):
    """One tiny saved model of each kind: a lite0 stack, a 1-epoch head-only lite0 fine-tune at
    64 px, and their ensemble fitted on 4 held-out images per class."""
    root = tmp_path_factory.mktemp("modeldir")
    listing = from_folder(str(flowers_small))
    rt = Runtime(cache_dir=cache_dir, device="cpu")
    stack = StackedClassifier(["lite0"], folds=2, runtime=rt)
    stack.fit(listing.paths, listing.labels)
    ft = FineTunedClassifier(
        "lite0", head_epochs=1, epochs=0, input_size=64, batch_size=8, val_split=0.3, runtime=rt
    )
    ft.fit(listing.paths, listing.labels)
    dirs = {
        "stack": stack.save(str(root / "stack"), report=False),
        "finetune": ft.save(str(root / "finetune"), report=False),
    }
    held = make_slice(root / "heldout", FLOWERS, CLASSES, 4, offset=10)
    hl = from_folder(str(held))
    ens = EnsembleClassifier([dirs["stack"], dirs["finetune"]], method="all", folds=2, runtime=rt)
    ens.fit(hl.paths, hl.labels)
    dirs["ensemble"] = ens.save(str(root / "ensemble"), report=False)
    return dirs


@pytest.fixture(scope="module")
def image(flowers_small):
    d = flowers_small / "daisy"
    return str(d / sorted(os.listdir(d))[0])


# ---------------------------------------------------------------------- damage
def edit_manifest(d, fn):
    path = os.path.join(d, "manifest.json")
    with open(path) as fh:
        m = json.load(fh)
    fn(m)
    with open(path, "w") as fh:
        json.dump(m, fh)


def edit_tensors(d, fn):
    path = os.path.join(d, "weights.safetensors")
    t = dict(load_file(path))
    fn(t)
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, path)


def truncate(d):
    path = os.path.join(d, "weights.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def put_nan(name):
    def fn(t):
        a = t[name].copy()
        a.reshape(-1)[0] = np.nan
        t[name] = a

    return fn


def first_float(t, prefix):
    return next(k for k in sorted(t) if k.startswith(prefix) and t[k].dtype.kind == "f")


def member_dir(d, i=0):
    with open(os.path.join(d, "manifest.json")) as fh:
        return os.path.join(d, json.load(fh)["members"][i]["dir"])


def weights_outside(d, how, models, kind):
    """Point the manifest's weights (stack, finetune) or first member (ensemble) outside ``d``."""
    if kind == "ensemble":
        target = os.path.join(os.path.dirname(d), "stolen")
        shutil.copytree(models["stack"], target)
        rel = "../stolen" if how == "relative" else os.path.abspath(target)
        edit_manifest(d, lambda m: m["members"][0].__setitem__("dir", rel))
        return
    target = os.path.join(os.path.dirname(d), "stolen.safetensors")
    shutil.copyfile(os.path.join(models[kind], "weights.safetensors"), target)
    if how == "symlink":
        os.unlink(os.path.join(d, "weights.safetensors"))
        os.symlink(target, os.path.join(d, "weights.safetensors"))
        return
    rel = "../stolen.safetensors" if how == "relative" else os.path.abspath(target)
    edit_manifest(d, lambda m: m.__setitem__("weights", rel))


def member_symlink_outside(d, models, kind):
    m0 = member_dir(d)
    target = os.path.join(os.path.dirname(d), "stolen")
    shutil.copytree(models["stack"], target)
    shutil.rmtree(m0)
    os.symlink(target, m0)


def setitem(key, value):
    return lambda m: m.__setitem__(key, value)


def extra_class(m):
    m["classes"] = [*m["classes"], "zinnia"]


# kind -> name -> (damage(d, models, kind), words the error line must contain)
DAMAGES = {
    "stack": {
        "truncated": (lambda d, *_: truncate(d), "cannot read the weights"),
        "missing-key": (
            lambda d, *_: edit_manifest(d, lambda m: m.pop("head")),
            '"head" is missing',
        ),
        "classes-string": (
            lambda d, *_: edit_manifest(d, setitem("classes", "daisy")),
            '"classes" must be a non-empty list of distinct non-empty strings, got "daisy"',
        ),
        "class-count": (
            lambda d, *_: edit_manifest(d, extra_class),
            "tensor 'head0.weight' has shape (3, 1280) but the manifest's 4 classes",
        ),
        "duplicate-class": (
            lambda d, *_: edit_manifest(d, setitem("classes", ["daisy", "daisy", "tulip"])),
            'lists "daisy" twice',
        ),
        "wrong-shape": (
            lambda d, *_: edit_tensors(
                d, lambda t: t.__setitem__("head1.mean", t["head1.mean"][:-1])
            ),
            "tensor 'head1.mean' has shape (1279,)",
        ),
        "nan": (
            lambda d, *_: edit_tensors(d, put_nan("head0.weight")),
            "'head0.weight' has non-finite",
        ),
        "temperature-0": (
            lambda d, *_: edit_manifest(d, setitem("temperature", 0)),
            '"temperature" must be a number > 0, got 0',
        ),
        "outside-relative": (
            lambda d, models, kind: weights_outside(d, "relative", models, kind),
            '"weights" leads out of the model directory',
        ),
        "outside-absolute": (
            lambda d, models, kind: weights_outside(d, "absolute", models, kind),
            '"weights" is an absolute path',
        ),
        "outside-symlink": (
            lambda d, models, kind: weights_outside(d, "symlink", models, kind),
            "outside the model directory",
        ),
    },
    "finetune": {
        "truncated": (lambda d, *_: truncate(d), "cannot read the weights"),
        "missing-key": (
            lambda d, *_: edit_manifest(d, lambda m: m.pop("backbone")),
            '"backbone" is missing',
        ),
        "classes-string": (
            lambda d, *_: edit_manifest(d, setitem("classes", "daisy")),
            '"classes" must be a non-empty list',
        ),
        "class-count": (
            lambda d, *_: edit_manifest(d, extra_class),
            "tensor 'fc.weight' has shape (3, 1280) but the manifest's 4 classes",
        ),
        "wrong-shape": (
            lambda d, *_: edit_tensors(
                d, lambda t: t.__setitem__("fc.weight", t["fc.weight"][:, :-1])
            ),
            "tensor 'fc.weight' has shape (3, 1279)",
        ),
        "nan": (  # a backbone tensor, not only the head: every tensor is checked
            lambda d, *_: edit_tensors(d, lambda t: put_nan(first_float(t, "backbone."))(t)),
            "has non-finite values",
        ),
        "temperature-0": (
            lambda d, *_: edit_manifest(d, setitem("temperature", 0)),
            '"temperature" must be a number > 0',
        ),
        "dropout-string": (
            lambda d, *_: edit_manifest(d, lambda m: m["head"].__setitem__("dropout", "0.2")),
            '"head.dropout" must be a number >= 0 and < 1, got "0.2"',
        ),
        "outside-relative": (
            lambda d, models, kind: weights_outside(d, "relative", models, kind),
            '"weights" leads out of the model directory',
        ),
        "outside-absolute": (
            lambda d, models, kind: weights_outside(d, "absolute", models, kind),
            '"weights" is an absolute path',
        ),
    },
    "ensemble": {
        "truncated": (lambda d, *_: truncate(d), "cannot read the weights"),
        "missing-key": (
            lambda d, *_: edit_manifest(d, lambda m: m.pop("members")),
            '"members" is missing',
        ),
        "classes-string": (
            lambda d, *_: edit_manifest(d, setitem("classes", "daisy")),
            '"classes" must be a non-empty list',
        ),
        "class-count": (
            lambda d, *_: edit_manifest(d, extra_class),
            "has other classes than the ensemble",
        ),
        "wrong-shape": (
            lambda d, *_: edit_tensors(
                d, lambda t: t.__setitem__("stacked.weight", t["stacked.weight"][:, :-1])
            ),
            "tensor 'stacked.weight' has shape (3, 5)",
        ),
        "weights-not-summing-to-1": (
            lambda d, *_: edit_tensors(
                d, lambda t: t.__setitem__("weighted.w", t["weighted.w"] * 2)
            ),
            "'weighted.w' must hold member weights >= 0 that sum to 1",
        ),
        "nan": (
            lambda d, *_: edit_tensors(d, put_nan("stacked.bias")),
            "'stacked.bias' has non-finite",
        ),
        "member-temperature-0": (  # members are validated recursively
            lambda d, *_: edit_manifest(member_dir(d), setitem("temperature", 0)),
            '"temperature" must be a number > 0',
        ),
        "member-nan": (
            lambda d, *_: edit_tensors(member_dir(d), put_nan("head1.bias")),
            "'head1.bias' has non-finite",
        ),
        "member-self": (  # a member that is the ensemble itself would recurse for ever
            lambda d, *_: edit_manifest(d, lambda m: m["members"][0].__setitem__("dir", ".")),
            "is the model directory itself",
        ),
        "outside-relative": (
            lambda d, models, kind: weights_outside(d, "relative", models, kind),
            '"members[0].dir" leads out of the model directory',
        ),
        "outside-absolute": (
            lambda d, models, kind: weights_outside(d, "absolute", models, kind),
            '"members[0].dir" is an absolute path',
        ),
        "outside-symlink": (member_symlink_outside, "outside the model directory"),
    },
}
CASES = [(kind, name) for kind, damages in DAMAGES.items() for name in damages]


def copy_model(models, kind, tmp_path):
    d = str(tmp_path / "copy" / kind)
    shutil.copytree(models[kind], d, symlinks=True)
    return d


def predict(d, image, cache_dir):
    return run_cli("predict", d, image, "--cache", cache_dir, "--device", "cpu", "-q")


@pytest.mark.parametrize("kind,damage", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_damaged_model_is_one_line_error(models, image, cache_dir, tmp_path, kind, damage):
    d = copy_model(models, kind, tmp_path)
    spoil, words = DAMAGES[kind][damage]
    spoil(d, models, kind)
    code, out, err = predict(d, image, cache_dir)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0], lines[0]
    assert "damaged" in lines[0] or "only to files inside it" in lines[0], lines[0]
    assert out == ""


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_undamaged_copy_still_predicts(models, image, cache_dir, tmp_path, kind):
    d = copy_model(models, kind, tmp_path)
    edit_manifest(d, setitem("a_key_from_the_future", {"x": 1}))  # unknown keys are fine
    code, out, err = predict(d, image, cache_dir)
    assert code == 0, err
    rows = out.strip().splitlines()
    assert rows[0].startswith("path,class_1,prob_1") and rows[1].startswith(image)


def test_every_saved_manifest_and_weights_pass(models):
    for kind, d in models.items():
        m = load_model(d, device="cpu")
        assert list(m.classes_) == CLASSES and getattr(m, "kind", "stack") == kind


def test_mlp_head_tensors_are_checked():
    """Layer shapes of an mlp stack head must chain: features -> hidden -> classes."""
    D, H, C = 8, 5, 3
    manifest = {
        "kind": "stack",
        "classes": ["a", "b", "c"],
        "backbones": [{"name": "x", "feature_dim": D}],
        "head": {"kind": "mlp", "params": {}},
        "n_heads": 1,
    }
    good = {
        "head0.mean": np.zeros(D, np.float32),
        "head0.scale": np.ones(D, np.float32),
        "head0.layer0.weight": np.zeros((H, D), np.float32),
        "head0.layer0.bias": np.zeros(H, np.float32),
        "head0.layer1.weight": np.zeros((C, H), np.float32),
        "head0.layer1.bias": np.zeros(C, np.float32),
    }
    validate_tensors("m", manifest, good, "m/weights.safetensors")
    bad = [
        ({"head0.layer1.weight": np.zeros((C, H + 1), np.float32)}, "'head0.layer1.weight'"),
        ({"head0.layer0.bias": np.zeros(H - 1, np.float32)}, "'head0.layer0.bias'"),
        ({"head0.layer1.weight": np.zeros((C + 1, H), np.float32)}, "3 classes"),
        ({"head0.scale": np.zeros(D, np.float32)}, "must be > 0"),
        ({"head1.mean": np.zeros(D, np.float32)}, "belongs to no head"),
        ({"head0.layer0.weight": np.full((H, D), math.inf, np.float32)}, "non-finite"),
        ({"head0.extra.weight": np.zeros((1, 1), np.float32)}, "needs tensors"),
    ]
    for change, words in bad:
        with pytest.raises(StackvisionError, match=words.replace("(", r"\(")) as exc:
            validate_tensors("m", manifest, {**good, **change}, "m/weights.safetensors")
        assert "\n" not in str(exc.value)
    missing = {k: v for k, v in good.items() if k != "head0.layer1.bias"}
    with pytest.raises(StackvisionError, match="'head0.layer1.bias' is missing"):
        validate_tensors("m", manifest, missing, "m/weights.safetensors")


# (kind, change to the manifest, words of the error); checked in-process (load_model), fast.
MORE = [
    ("stack", lambda m: m.__setitem__("n_heads", True), '"n_heads" must be an integer >= 1, got true'),
    ("stack", lambda m: m.__setitem__("temperature", math.nan), '"temperature" must be a number > 0'),
    ("stack", lambda m: m.__setitem__("folds", 1), '"folds" must be 0 or an integer >= 2'),
    ("stack", lambda m: m["backbones"][0].__setitem__("feature_dim", "1280"), '"backbones[0].feature_dim"'),
    ("stack", lambda m: m["head"].__setitem__("kind", "svm"), '"head.kind" must be one of'),
    ("stack", lambda m: m.__setitem__("calibration", {}), '"calibration" must name'),
    ("stack", lambda m: m.__setitem__("weights", "."), "is the model directory itself"),
    ("stack", lambda m: m.__setitem__("classes", []), '"classes" must be a non-empty list'),
    ("stack", lambda m: m.__setitem__("classes", ["daisy", "", "tulip"]), '"classes[1]" must be'),
    ("stack", lambda m: m.__setitem__("kind", ["stack"]), '"kind" must be a string'),
    ("finetune", lambda m: m["preprocess"]["mean"].append(0.5), '"preprocess.mean" must be a list of 3'),
    ("finetune", lambda m: m["preprocess"].__setitem__("gamma", 2), '"preprocess.gamma" is not a field'),
    ("finetune", lambda m: m["backbone"].__setitem__("architecture", "no_such_net"), "not a model this timm knows"),
    ("finetune", lambda m: m["head"].__setitem__("output", "sigmoid"), '"head.output" is sigmoid but 3 classes'),
    ("finetune", lambda m: m["training"]["augment"].__setitem__("blur", 1), '"training.augment.blur"'),
    ("ensemble", lambda m: m.__setitem__("members", m["members"][:1]), "a list of at least 2 member objects"),
    ("ensemble", lambda m: m["members"][0].__setitem__("kind", "finetune"), "is listed as 'finetune'"),
    ("ensemble", lambda m: m.__setitem__("method", "median"), '"method" must be one of'),
]  # fmt: skip


@pytest.mark.parametrize("kind,change,words", MORE, ids=[f"{k}-{w[:24]}" for k, _, w in MORE])
def test_more_damage_in_process(models, tmp_path, kind, change, words):
    d = copy_model(models, kind, tmp_path)
    edit_manifest(d, change)
    with pytest.raises(StackvisionError) as exc:
        load_model(d, device="cpu")
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_unreadable_manifests(models, tmp_path):
    d = copy_model(models, "stack", tmp_path)
    mf = os.path.join(d, "manifest.json")
    for content, words in [
        (b"\xff\xfe not utf-8", "cannot read"),
        (b"[1, 2]", "is not a stackvision manifest"),
        (b'{"format": "stackvision-model", "format_version": true}', "format version"),
    ]:
        with open(mf, "wb") as fh:
            fh.write(content)
        with pytest.raises(StackvisionError, match=words):
            load_model(d)
