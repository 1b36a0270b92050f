"""``--decoder torchvision`` (gpu_decode.py): run here on device="cpu", the same code as on CUDA
but for ``decode_jpeg``'s device (nvJPEG there, libjpeg here)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from stackvision.backbones import resolve
from stackvision.cache import FeatureCache, store_fields, store_key
from stackvision.cli import main
from stackvision.decoding import DecodePool
from stackvision.errors import StackvisionError
from stackvision.extract import extract
from stackvision.gpu_decode import TorchvisionPool, pixels_id, resolve_decoder

from .conftest import synthetic_image
from .serving_helpers import images_of

pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def mixed(woof_val, tmp_path_factory):
    """Real JPEGs, a PNG, an EXIF-rotated JPEG, and three bad files."""
    d = tmp_path_factory.mktemp("mixed")
    real = images_of(woof_val)[:6]
    for i, p in enumerate(real):
        shutil.copyfile(p, d / f"{i}.jpg")
    Image.open(real[0]).convert("RGB").save(d / "png.png")
    img = Image.open(real[1]).convert("RGB").resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(d / "rotated.jpg", exif=exif, quality=95)
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_bytes(b"not an image at all")
    (d / "truncated.jpg").write_bytes((d / "0.jpg").read_bytes()[:400])
    return sorted(str(p) for p in d.iterdir())


def _decode_both(paths, pps):
    items = [(p, pps) for p in paths]
    with TorchvisionPool("cpu", workers=2) as tv, DecodePool(2) as pil:
        return next(tv.run([items])), next(pil.run([items]))


def test_auto_picks_torchvision_only_on_cuda():
    assert resolve_decoder("auto", "cpu") == "pil"
    assert resolve_decoder("auto", "cuda") == "torchvision"
    assert resolve_decoder("auto", "cuda:1") == "torchvision"
    assert resolve_decoder("threads", "cuda") == "threads"
    assert (pixels_id("torchvision"), pixels_id("processes"), pixels_id("pil")) == (
        "torchvision",
        "pil",
        "pil",
    )
    with pytest.raises(StackvisionError, match="unknown decoder 'nvjpeg'"):
        resolve_decoder("nvjpeg", "cpu")


def test_torchvision_crops_are_close_to_pils_and_bad_files_are_listed(mixed):
    pps = [("lite0", resolve("lite0").preprocess), ("lite2", resolve("lite2").preprocess)]
    tv, pil = _decode_both(mixed, pps)
    by_name = dict(zip([p.rsplit("/", 1)[1] for p in mixed], zip(tv, pil)))
    for name in ("empty.jpg", "text.jpg", "truncated.jpg"):
        a, b = by_name[name]
        assert isinstance(a, Exception) and isinstance(b, Exception), name
        assert a.reason == b.reason  # the same reason as the PIL decoders give
    good = [n for n in by_name if n not in ("empty.jpg", "text.jpg", "truncated.jpg")]
    assert len(good) == 8
    for name in good:
        a, b = by_name[name]
        for key, size in (("lite0", 224), ("lite2", 260)):
            assert a[key].shape == (size, size, 3) and a[key].dtype == np.uint8
            diff = np.abs(a[key].astype(int) - b[key].astype(int))
            # another IDCT and resize: a fraction of a grey level on average, never an offset
            # image (an orientation or crop error would be tens of levels)
            assert diff.mean() < 2.0, (name, key, diff.mean())
    # EXIF orientation is applied: 300x200 stored, shown 200x300 -> crop of the upright image
    a, b = by_name["rotated.jpg"]
    assert np.abs(a["lite0"].astype(int) - b["lite0"].astype(int)).mean() < 2.0


def test_a_bgr_backbone_gets_its_channels_reversed(mixed):
    from dataclasses import replace

    pp = resolve("lite0").preprocess
    tv, _ = _decode_both(mixed[:1], [("rgb", pp), ("bgr", replace(pp, channel_order="BGR"))])
    assert (tv[0]["bgr"] == tv[0]["rgb"][..., ::-1]).all()


def test_batched_resize_equals_one_image_at_a_time(mixed):
    import torch

    from stackvision.gpu_decode import resize_crop

    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (5, 3, 300, 410), dtype=np.uint8))
    for name in ("lite0", "lite2"):
        pp = resolve(name).preprocess
        together = resize_crop(imgs, pp)
        assert together.shape == (5, pp.input_size, pp.input_size, 3)
        for i in range(5):
            assert torch.equal(together[i], resize_crop(imgs[i], pp))


def test_several_decode_threads_give_the_same_results_in_order(mixed):
    pps = [("lite0", resolve("lite0").preprocess), ("lite2", resolve("lite2").preprocess)]
    batches = [[(p, pps) for p in mixed[i : i + 3]] for i in range(0, len(mixed), 3)]
    with TorchvisionPool("cpu", workers=2, decoders=1) as one:
        a = list(one.run(batches))
    with TorchvisionPool("cpu", workers=2, decoders=3) as three:
        b = list(three.run(iter(batches)))  # a generator, as extract passes it
    assert [len(r) for r in a] == [len(bt) for bt in batches] == [len(r) for r in b]
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            if isinstance(x, Exception):
                assert isinstance(y, Exception) and x.reason == y.reason
            else:
                assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert sum(isinstance(x, Exception) for r in b for x in r) == 3


def test_extract_keeps_torchvision_features_in_their_own_store(mixed, tmp_path):
    spec = resolve("lite0")
    cache = FeatureCache(str(tmp_path / "cache"))
    tv = extract(mixed, [spec], cache=cache, decoder="torchvision", device="cpu")
    assert tv.stats["pixels"] == "torchvision" and tv.stats["n_computed"] == 8
    assert tv.stats["n_bad"] == 3 and {p.path.rsplit("/", 1)[1] for p in tv.problems} == {
        "empty.jpg",
        "text.jpg",
        "truncated.jpg",
    }
    again = extract(mixed, [spec], cache=cache, decoder="torchvision", device="cpu")
    assert again.stats["n_computed"] == 0  # cached, in the torchvision store
    pil = extract(mixed, [spec], cache=cache, decoder="auto", device="cpu")
    assert pil.stats["pixels"] == "pil" and pil.stats["n_computed"] == 8  # not mixed up
    a, b = tv.blocks["lite0"][:, 0], pil.blocks["lite0"][:, 0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98 and not np.array_equal(a, b)
    keys = {store_key(store_fields(spec, "avg", "fp32", px)) for px in ("pil", "torchvision")}
    on_disk = {p.stem for p in (tmp_path / "cache" / "features-v1").glob("*.sqlite")}
    assert keys == on_disk and len(keys) == 2


def test_cli_extract_with_the_torchvision_decoder(mixed, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in mixed[:4]:
        shutil.copy(p, folder)
    synthetic_image((80, 60)).save(folder / "synthetic.jpg")
    run = ["extract", str(folder), "--backbones", "lite0", "--tta", "flip", "-q"]
    run += ["--cache", str(tmp_path / "c"), "--device", "cpu", "--decoder", "torchvision"]
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "passes/s" in out and "img/s" in out
    row = dict(zip(*[ln.split() for ln in out.splitlines()[:3:2]]))
    assert float(row["passes/s"]) == pytest.approx(2 * float(row["img/s"]), rel=0.02)  # 2 views
    # shards are exported from the torchvision store (the PIL one is empty)
    shards = tmp_path / "shards"
    assert main([*run, "--export-shards", str(shards)]) == 0
    capsys.readouterr()
    from stackvision.shards import ShardedFeatures

    assert ShardedFeatures(str(shards)).shape == (5, 2, 1280)
    assert main([*run[:-2], "--decoder", "torchvision", "--runner", "ray"]) == 2
    err = capsys.readouterr().err
    assert "--decoder torchvision is not available with the Ray runner" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:  # argparse: usage and the choices, exit 2
        main([*run[:-2], "--decoder", "gpu"])
    assert exit_.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err


def test_fine_tuning_decodes_with_pil_and_keeps_the_worker_kind():
    from stackvision import Runtime
    from stackvision.finetune import FineTunedClassifier

    def kind(decoder):
        rt = Runtime(device="cpu", decoder=decoder)
        return FineTunedClassifier("lite0", runtime=rt)._decoder(1000)

    assert kind("processes") == "processes" and kind("threads") == "threads"
    assert kind("torchvision") == kind("auto") == "threads"  # a CPU model: PIL in threads
