"""Whole-process extraction: `stackvision extract` vs a plain script, each a fresh process.

What a user times with a stopwatch: from typing the command to the prompt coming back, start-up
(imports, engine set-up, ONNX export when missing) included. 1,000 imagewoof images (val, spread
over the classes), one backbone (lite0), one view (``--tta none``), a cold feature cache every
run, alternating round by round:

* plain: a fresh ``python`` running the lean loop a user writes (PIL decode + resize + crop, numpy
  normalisation, eager timm model, batches of 32; see :func:`plain_child`);
* CLI, warm engine folder: ``stackvision extract DIR --backbones lite0 --tta none --cache ROOT``
  where ROOT holds a copy of an engine folder with the compiled export, and no features;
* CLI, cold engine folder: the same with an empty ROOT (ONNX export and compile in the process).

With several ``--src`` folders (e.g. ``--src /work/main/src --src src``) the CLI runs once per
source tree, for before/after figures side by side. Prints images/s and passes/s (backbone
forward passes per second: images x backbones x views; here equal, one view).

    python benchmarks/extract_process.py --rounds 3
    python benchmarks/extract_process.py --n-images 200 --rounds 1 --src /work/main/src --src src
    python benchmarks/extract_speed.py --whole-process ...   # the same, from the in-loop script
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "imagewoof"
RESULTS = REPO / "benchmarks" / "results" / "extract_process.md"


def plain_child(list_file: str, batch_size: int = 32) -> None:
    """The plain script (run as its own process): what a user writes without stackvision."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(REPO / "src"))
    from stackvision.backbones import build_model, resolve

    spec = resolve("lite0")  # = timm.create_model("tf_efficientnet_lite0", pretrained=True, ...)
    model = build_model(spec, "avg")
    pp = spec.preprocess
    mean = np.asarray(pp.mean, np.float32) * 255
    std = np.asarray(pp.std, np.float32) * 255
    paths = Path(list_file).read_text().splitlines()
    out = []

    def load(p):
        img = Image.open(p).convert("RGB")
        w, h = img.size
        r, s = pp.resize_size, pp.input_size
        nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        return np.asarray(img.crop((left, top, left + s, top + s)), np.float32)

    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            x = (np.stack([load(p) for p in paths[i : i + batch_size]]) - mean) / std
            out.append(model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy())
    print(f"plain: {sum(len(o) for o in out)} images, dim {out[0].shape[1]}")


def image_folder(n: int, work: Path) -> Path:
    """``n`` imagewoof/val images spread over the classes, as symlinks in class folders."""
    files = sorted(p for p in (DATA / "val").rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    step = len(files) / min(n, len(files))
    chosen = [files[int(i * step)] for i in range(min(n, len(files)))]
    root = work / "images"
    for p in chosen:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        (root / p.parent.name / p.name).symlink_to(p)
    (work / "list.txt").write_text("\n".join(str(p) for p in chosen))
    return root


def _env(src: Path | None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{p.stderr[-2000:]}")
    return wall, p.stdout


def cli_cmd(images: Path, root: Path) -> list[str]:
    exe = Path(sys.executable).with_name("stackvision")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "stackvision.cli"]
    return [*head, "extract", str(images), "--backbones", "lite0", "--tta", "none",
            "--cache", str(root), "--device", "cpu", "-q"]  # fmt: skip


def cli_summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    i = next(k for k, ln in enumerate(lines) if ln.split()[:1] == ["images"])
    return dict(zip(lines[i].split(), lines[i + 2].split()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; median reported")
    ap.add_argument("--src", action="append", help="source tree(s) for the CLI (default: src)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-engine-folder runs")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--plain-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain_child:
        plain_child(args.plain_child)
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import cpu_flags, today, write_results

    srcs = [Path(s).resolve() for s in (args.src or [str(REPO / "src")])]
    work = Path(tempfile.mkdtemp(prefix="sv-process-"))
    images = image_folder(args.n_images, work)
    n = len((work / "list.txt").read_text().splitlines())
    warm_engines = work / "warm-root"
    print(f"{n} images; preparing a warm engine folder ...", flush=True)
    timed(cli_cmd(images / os.listdir(images)[0], warm_engines), _env(srcs[-1]))
    shutil.rmtree(warm_engines / "features-v1")

    kinds = [("plain", None, None)]
    for s in srcs:
        kinds.append(("cli-warm", s, "warm"))
        if not args.no_cold:
            kinds.append(("cli-cold", s, "cold"))
    walls: dict[tuple, list[float]] = {(k, s): [] for k, s, _ in kinds}
    own: dict[tuple, list[dict]] = {(k, s): [] for k, s, _ in kinds}
    load_start = os.getloadavg()[0]
    for r in range(args.rounds):
        for kind, src, engines in kinds:
            if kind == "plain":
                cmd = [sys.executable, __file__, "--plain-child", str(work / "list.txt")]
                wall, _ = timed(cmd, _env(None))
            else:
                root = work / f"root-{r}-{kind}-{srcs.index(src)}"
                if engines == "warm":
                    shutil.copytree(warm_engines, root)
                wall, out = timed(cli_cmd(images, root), _env(src))
                own[(kind, src)].append(cli_summary(out))
                shutil.rmtree(root)
            walls[(kind, src)].append(wall)
            print(f"round {r + 1}: {kind:8s} {str(src or ''):40s} {wall:6.1f} s "
                  f"({n / wall:.1f} img/s)", flush=True)  # fmt: skip
    load_end = os.getloadavg()[0]
    plain_s = statistics.median(walls[("plain", None)])
    rows = []
    for kind, src, _ in kinds:
        s = statistics.median(walls[(kind, src)])
        inner = own[(kind, src)]
        said = "-"
        if inner:
            said = f"{statistics.median(float(x['img/s']) for x in inner):.1f} img/s"
            if "passes/s" in inner[0]:
                said += f", {statistics.median(float(x['passes/s']) for x in inner):.1f} passes/s"
        label = {"plain": "plain script (PIL + numpy + eager timm)",
                 "cli-warm": "`stackvision extract`, warm engine folder",
                 "cli-cold": "`stackvision extract`, cold engine folder"}[kind]  # fmt: skip
        rows.append(
            f"| {label} | {'' if src is None else f'`{src}`'} | "
            f"{' / '.join(f'{w:.1f}' for w in walls[(kind, src)])} | {s:.1f} | {n / s:.1f} | "
            f"{n / s:.1f} | {plain_s / s:.2f}x | {said} |"
        )
    cmd = "python " + shlex.join(["benchmarks/extract_process.py", *(argv or sys.argv[1:])])
    text = f"""## Whole-process extraction: the CLI vs a plain script (issue 14)

- Date: {today()}; machine: {cpu_flags()}; 1-min load average {load_start:.1f} at start,
  {load_end:.1f} at end (other jobs shared the cores: compare rows, not absolutes)
- Command: `{cmd}`
- {n} imagewoof/val images, lite0, one view (`--tta none`), a cold feature cache every run; each
  figure is a whole process (start-up, imports, engine set-up, decode, model, cache writes), run
  alternately, {args.rounds} round(s), median. passes/s = images x backbones x views / s (here
  equal to images/s). "its own summary" is what the CLI prints (its in-loop rate).

| process | source tree | seconds (each round) | median s | images/s | passes/s | vs plain | its own summary |
| --- | --- | --- | ---: | ---: | ---: | ---: | --- |
{chr(10).join(rows)}
"""
    write_results(args.out, text)
    print(f"written to {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
