"""Load test of `stackvision serve`: N concurrent clients, a fixed number of requests.

Starts the real server (a subprocess on a free loopback port) twice on the same model: with dynamic
batching (``--max-batch 32``) and with ``--max-batch 1`` (one forward pass per image). Each client
sends one-image multipart requests back to back (images from imagewoof/val, cycled). Reports
throughput, p50/p95/p99 latency, errors and the speed-up of batching, and writes
``benchmarks/results/serve_load.md``.

    python benchmarks/serve_load.py                      # trains a small lite0 model first
    python benchmarks/serve_load.py --model MODEL --clients 16 --requests 192
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

from _common import cpu_description as machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "imagewoof"
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
    def __init__(self, model: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])
        )
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


def run(model: Path, images: list[bytes], args, max_batch: int) -> dict:
    srv = Server(model, "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: train a small one)")
    ap.add_argument("--backbones", default="lite0", help="for the trained model (default: lite0)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.md"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model = Path(args.model) if args.model else None
    if model is None:
        print(f"training a {args.backbones} model on 4 imagewoof classes x 12 images ...")
        model = train_model(work / "model", args.backbones, str(work / "cache"))
    files = [p for c in CLASSES for p in sorted((DATA / "val" / c).iterdir())[:8]]
    images = [p.read_bytes() for p in files]

    load_before = os.getloadavg()[0]
    results = []
    for mb in (32, 1):
        print(f"--max-batch {mb}: {args.clients} clients, {args.requests} requests ...", flush=True)
        r = run(model, images, args, mb)
        print(
            f"  {r['throughput']:.2f} req/s, p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms, "
            f"p99 {r['p99']:.0f} ms, errors {r['errors']}, mean batch {r['mean_batch']:.1f}"
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
        f"| {r['max_batch']} | {r['requests']} | {r['errors']} | {r['throughput']:.2f} | "
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

| --max-batch | requests | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{rows}

Dynamic batching speed-up over batch size 1: **{speedup:.2f}x** throughput.
"""
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"written to {args.out}")
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
