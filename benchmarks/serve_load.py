"""Load test of `stackvision serve`: N concurrent clients, a fixed number of requests.

``--mode load`` (default): starts the real server (a subprocess on a free loopback port) twice on
the same model: with dynamic batching (``--max-batch 32``) and with ``--max-batch 1`` (one forward
pass per image). Each client sends one-image multipart requests back to back (images from
imagewoof/val, cycled). Reports throughput, p50/p95/p99 latency, errors and the speed-up of
batching, and writes ``benchmarks/results/serve_load.md``.

``--mode latency``: one client, one image per request, one request at a time (what a user waiting
for an answer sees). With several ``--src`` folders (e.g. ``--src /work/main/src --src src`` for
before/after), one server per source tree, all on the same model, measured in alternating rounds
so that other load on the machine hits them alike; prints p50/p90/p99 and their ratios.

``--mode profile``: no server; in this process (BLAS on one thread, as in the server), where the
time of one request goes (decode and crop, then ``forward_uint8``), by cProfile over
``--requests`` single images.

    python benchmarks/serve_load.py                      # trains a small lite0 model first
    python benchmarks/serve_load.py --model MODEL --clients 16 --requests 192
    python benchmarks/serve_load.py --mode latency --model MODEL --src /work/main/src --src src
    python benchmarks/serve_load.py --mode profile --model MODEL --requests 30
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from _common import cpu_flags as machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "imagewoof"
DEFAULT_OUT = str(ROOT / "benchmarks" / "results" / "serve_load.md")
CLASSES = ["n02086240", "n02087394", "n02088364", "n02099601"]


def train_model(out: Path, backbones: str, cache: str) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from stackvision import Runtime, StackedClassifier

    paths, labels = [], []
    for c in CLASSES:
        files = sorted(os.listdir(DATA / "train" / c))[:12]
        paths += [str(DATA / "train" / c / f) for f in files]
        labels += [c] * len(files)
    model = StackedClassifier(backbones.split(","), folds=2, runtime=Runtime(cache))
    model.fit(paths, labels).save(str(out), report=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *extra: str, src: Path = ROOT / "src", env_extra=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ) | dict(env_extra or {})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "stackvision.cli", "serve", str(model), "--device", "cpu"]
        cmd += ["--port", str(self.port), "--log-level", "warning", *extra]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def client(c: httpx.AsyncClient):
        nonlocal errors
        for i in counter:
            files = [("file", (f"{i}.jpg", images[i % len(images)], "image/jpeg"))]
            t0 = time.perf_counter()
            try:
                r = await c.post(url + "/predict", files=files, timeout=300)
                ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {
        "requests": requests,
        "errors": errors,
        "seconds": wall,
        "throughput": requests / wall,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
    }


def run(model: Path, images: list[bytes], args, max_batch: int, src: Path = ROOT / "src") -> dict:
    srv = Server(
        model, "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), src=src
    )
    try:
        asyncio.run(load(srv.url, images, args.clients, args.warmup))  # not counted
        before = httpx.get(srv.url + "/health").json()["batching"]
        res = asyncio.run(load(srv.url, images, args.clients, args.requests))
        after = httpx.get(srv.url + "/health").json()["batching"]
    finally:
        srv.stop()
    batches = after["batches"] - before["batches"]
    res["mean_batch"] = (after["images"] - before["images"]) / batches if batches else 0.0
    res["max_batch"] = max_batch
    return res


def sequential(url: str, images: list[bytes], n: int, offset: int = 0) -> list[float]:
    """``n`` one-image requests, one at a time; their latencies in ms (a failure raises)."""
    out = []
    with httpx.Client() as c:
        for i in range(offset, offset + n):
            files = [("file", (f"{i}.jpg", images[i % len(images)], "image/jpeg"))]
            t0 = time.perf_counter()
            r = c.post(url + "/predict", files=files, timeout=300)
            out.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                raise SystemExit(f"{url}: HTTP {r.status_code} {r.text[:200]}")
    return out


def latency_mode(model: Path, images: list[bytes], args) -> str:
    # "PATH" or "PATH::VAR=VALUE,VAR=VALUE" (environment of that server, e.g. for an ablation)
    variants = [v.partition("::") for v in (args.src or [str(ROOT / "src")])]
    srcs = [Path(p).resolve() for p, _, _ in variants]
    envs = [dict(kv.split("=", 1) for kv in e.split(",")) if e else {} for _, _, e in variants]
    if args.cache:  # serve has no --cache: the engine folder comes from $STACKVISION_CACHE
        os.environ["STACKVISION_CACHE"] = args.cache
    servers = [Server(model, src=s, env_extra=e) for s, e in zip(srcs, envs)]
    lat: list[list[float]] = [[] for _ in srcs]
    load_before = os.getloadavg()[0]
    try:
        for srv in servers:
            sequential(srv.url, images, args.warmup)
        per_round = max(1, args.requests // args.rounds)
        for r in range(args.rounds):
            for k, srv in enumerate(servers):
                lat[k] += sequential(srv.url, images, per_round, offset=r * per_round)
    finally:
        for srv in servers:
            srv.stop()
    load_after = os.getloadavg()[0]
    stats = []
    for s, e, xs in zip(srcs, envs, lat):
        a = np.asarray(xs)
        stats.append(
            {
                "src": f"{s}" + "".join(f" {k}={v}" for k, v in e.items()),
                "n": len(a),
                **{
                    p: float(np.percentile(a, q))
                    for p, q in (("p50", 50), ("p90", 90), ("p99", 99))
                },
                "mean": float(a.mean()),
            }
        )
    base = stats[0]
    rows = "\n".join(
        f"| `{st['src']}` | {st['n']} | {st['p50']:.1f} | {st['p90']:.1f} | {st['p99']:.1f} | "
        f"{st['mean']:.1f} | {base['p50'] / st['p50']:.2f}x |"
        for st in stats
    )
    for st in stats:
        print(
            f"{st['src']}: p50 {st['p50']:.1f} ms, p90 {st['p90']:.1f} ms, p99 {st['p99']:.1f} ms"
        )
    cmd = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/serve_load.py", *sys.argv[1:]])
    return f"""## One-image latency of `stackvision serve` (sequential requests)

- Date: {dt.date.today().isoformat()}; machine: {machine()}; 1-min load average {load_before:.1f}
  before, {load_after:.1f} after (whole-server requests over loopback: HTTP, decode, model, JSON)
- Command: `{cmd}`
- Model: `{model}`; one client, one image a request, one request at a time, {args.rounds} alternating
  rounds; server flags at their defaults (`--max-batch 32 --max-wait-ms 5`)

| source tree | requests | p50 ms | p90 ms | p99 ms | mean ms | p50 speed-up vs first |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{rows}
"""


def profile_mode(model_dir: Path, images: list[bytes], args) -> str:
    import cProfile
    import io
    import pstats

    sys.path.insert(0, str(ROOT / "src"))
    from stackvision import Runtime, load_model
    from stackvision.export import prepare_image
    from stackvision.threads import limit_blas_threads

    limit_blas_threads(1)  # as the server does (stackvision.serve.serve)

    model = load_model(str(model_dir), Runtime(args.cache, device="cpu") if args.cache else None)
    pp = model.input_preprocess()

    def one(i):
        model.forward_uint8(prepare_image(images[i % len(images)], pp)[None])

    for i in range(args.warmup):
        one(i)
    times = []
    prof = cProfile.Profile()
    for i in range(args.requests):
        t0 = time.perf_counter()
        prof.enable()
        one(i)
        prof.disable()
        times.append((time.perf_counter() - t0) * 1000)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(22)
    text = buf.getvalue()
    print(text)
    print(f"in-process, one image: p50 {np.median(times):.1f} ms (with cProfile on)")
    cmd = "python " + shlex.join(["benchmarks/serve_load.py", *sys.argv[1:]])
    return (
        f"## Profile of one served image (in-process, BLAS on one thread)\n\n"
        f"- Date: {dt.date.today().isoformat()}; machine: {machine()}; 1-min load average "
        f"{os.getloadavg()[0]:.1f}\n- Command: `{cmd}`\n- p50 {np.median(times):.1f} ms with "
        f"cProfile on\n\n```\n{text.strip()}\n```\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("load", "latency", "profile"), default="load")
    ap.add_argument(
        "--src",
        action="append",
        help="load, latency: a source tree to serve from (repeatable); PATH::VAR=VALUE,... also sets "
        "environment variables of that server",
    )
    ap.add_argument("--rounds", type=int, default=4, help="latency: alternating rounds")
    ap.add_argument("--cache", help="latency, profile: the feature/engine cache folder")
    ap.add_argument("--images", help="a folder of images to send (default: imagewoof/val, 32)")
    ap.add_argument("--stride", type=int, default=37, help="with --images: every n-th file")
    ap.add_argument("--model", help="model directory (default: train a small one)")
    ap.add_argument("--backbones", default="lite0", help="for the trained model (default: lite0)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    if args.mode != "load" and args.out == DEFAULT_OUT:
        args.out = str(ROOT / "benchmarks" / "results" / f"serve_{args.mode}.md")

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model = Path(args.model) if args.model else None
    if model is None:
        print(f"training a {args.backbones} model on 4 imagewoof classes x 12 images ...")
        model = train_model(work / "model", args.backbones, str(work / "cache"))
    if args.images:
        files = sorted(p for p in Path(args.images).rglob("*") if p.is_file())[:: args.stride][:64]
    else:
        files = [p for c in CLASSES for p in sorted((DATA / "val" / c).iterdir())[:8]]
    images = [p.read_bytes() for p in files]
    if args.mode != "load":
        text = (latency_mode if args.mode == "latency" else profile_mode)(model, images, args)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"written to {args.out}")
        return 0

    load_before = os.getloadavg()[0]
    if args.cache:  # serve has no --cache: the engine folder comes from $STACKVISION_CACHE
        os.environ["STACKVISION_CACHE"] = args.cache
    results = []
    for src in [Path(p).resolve() for p in (args.src or [str(ROOT / "src")])]:
        for mb in (32, 1):
            print(f"{src} --max-batch {mb}: {args.clients} clients, {args.requests} requests ...")
            r = run(model, images, args, mb, src) | {"src": src}
            print(
                f"  {r['throughput']:.2f} req/s, p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms, "
                f"p99 {r['p99']:.0f} ms, errors {r['errors']}, mean batch {r['mean_batch']:.1f}",
                flush=True,
            )
            results.append(r)
    load_after = os.getloadavg()[0]
    speedup = results[0]["throughput"] / results[1]["throughput"]
    print(f"dynamic batching speed-up over batch size 1: {speedup:.2f}x")

    try:
        import torch

        threads = torch.get_num_threads()
    except Exception:
        threads = "?"
    cmd = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/serve_load.py", *sys.argv[1:]])
    rows = "\n".join(
        f"| `{r['src']}` | {r['max_batch']} | {r['requests']} | {r['errors']} | "
        f"{r['throughput']:.2f} | "
        f"{r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['mean_batch']:.1f} |"
        for r in results
    )
    text = f"""## Serving under load (`stackvision serve`)

- Date: {dt.date.today().isoformat()}; machine: {machine()}; torch threads: {threads};
  1-min load average {load_before:.1f} before, {load_after:.1f} after (other work on the machine
  slows both runs alike)
- Command: `{cmd}`
- Model: {"`" + str(args.model) + "`" if args.model else f"{args.backbones}, 2 folds, flip TTA (2 views), logreg, trained on 4 imagewoof classes x 12 images"}
- Load: {args.clients} concurrent clients, {args.requests} one-image multipart requests each run
  (+{args.warmup} warm-up requests), images from imagewoof/val (~10 KB JPEGs), server on loopback,
  `--max-wait-ms {args.max_wait_ms:g}`

| source tree | --max-batch | requests | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{rows}

Dynamic batching speed-up over batch size 1 (first source tree): **{speedup:.2f}x** throughput.
"""
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"written to {args.out}")
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
