"""Run the fuzz targets: ``python fuzz/run.py [--targets decode,csv,manifest,http,prepare]
[--examples 100000] [--workers 2]`` (``make fuzz``).

Each target is driven by Hypothesis (generation only: no shrinking, no example database) in
chunks of ``--chunk`` inputs, each chunk with its own seed, spread over ``--workers`` processes.
Every input is run under a time limit (``--timeout`` seconds: a hang is a finding) and each worker
under an address-space limit (``--memory-gb``: a memory bomb becomes a MemoryError, which the code
must turn into a clean error, instead of the machine's OOM killer). An input that gives anything
but a result or a clean user error is a finding: it is saved under ``fuzz/findings/`` (the input
and the traceback) and the run goes on. Prints, and writes to ``--report`` (JSON), per target:
inputs, seconds, inputs/s, outcomes by category, the slowest input's time, peak RSS, findings.
Exit status 1 if there was any finding.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import resource
import signal
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "src")]

TARGETS = ("decode", "csv", "manifest", "http", "prepare")


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def init_worker(memory_gb: float) -> None:
    """A worker process's set-up: quiet, and with an address-space limit."""
    import logging
    import warnings

    logging.disable(logging.CRITICAL)  # python-multipart logs every malformed body
    warnings.filterwarnings("ignore", category=UserWarning)  # Pillow: "Corrupt EXIF data", ...
    if memory_gb > 0:
        limit = int(memory_gb * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _runner(target: str):
    """(strategy, call(input) -> outcome) for ``target``."""
    from fuzz import strategies as S
    from fuzz import targets as T

    if target == "decode":
        return S.decode_inputs(), lambda x: T.decode_target(*x)
    if target == "csv":
        ws = T.CsvWorkspace()
        return S.csv_inputs(), lambda x: T.csv_target(ws, *x)
    if target == "manifest":
        ws = T.ManifestWorkspace()
        return S.manifest_inputs(), lambda x: T.manifest_target(ws, *x)
    from stackvision.preprocess import Preprocess
    from stackvision.serve.requests import Limits

    if target == "http":
        limits = Limits(max_upload_bytes=2048, max_pixels=1_000_000, max_images=3)
        return S.http_inputs(), lambda x: T.http_target(*x, limits)
    if target == "prepare":
        limits = Limits(max_upload_bytes=10 * 1024 * 1024, max_pixels=4_000_000, max_images=1)
        pp = Preprocess(input_size=64, crop_pct=0.875)
        return S.image_bytes(), lambda x: T.prepare_target(x, pp, limits)
    raise ValueError(target)


def _save_finding(target: str, value, exc: BaseException) -> str:
    os.makedirs(os.path.join(HERE, "findings"), exist_ok=True)
    blob = repr(value).encode("utf-8", "backslashreplace")
    name = f"{target}-{hashlib.sha256(blob).hexdigest()[:12]}"
    with open(os.path.join(HERE, "findings", name + ".repr"), "wb") as fh:
        fh.write(blob)
    with open(os.path.join(HERE, "findings", name + ".txt"), "w") as fh:
        fh.write("".join(traceback.format_exception(exc)))
    return name


def run_chunk(target: str, seed: int, n: int, timeout: float) -> dict:
    """``n`` inputs of ``target`` from Hypothesis seed ``seed`` (in this process: a worker's, or
    a test's), each under a ``timeout`` in seconds."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    strategy, call = _runner(target)
    outcomes: collections.Counter = collections.Counter()
    findings: list[str] = []
    slowest = [0.0]

    @hseed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)  # fmt: skip
    @given(strategy)
    def one(value):
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            outcomes[call(value)] += 1
        except Hang as exc:
            outcomes["FINDING hang"] += 1
            findings.append(_save_finding(target, value, exc))
        except Exception as exc:  # noqa: BLE001 - the point: anything else is a finding
            outcomes[f"FINDING {type(exc).__name__}"] += 1
            findings.append(_save_finding(target, value, exc))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        slowest[0] = max(slowest[0], time.perf_counter() - t)

    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        one()
    finally:
        signal.signal(signal.SIGALRM, previous)
    return {
        "target": target,
        "inputs": sum(outcomes.values()),
        "seconds": time.perf_counter() - t0,
        "outcomes": dict(outcomes),
        "findings": findings,
        "slowest_s": slowest[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="decode,csv,manifest,http")
    p.add_argument("--examples", type=int, default=100_000, help="inputs per target")
    p.add_argument("--chunk", type=int, default=2_000, help="inputs per Hypothesis run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    p.add_argument("--memory-gb", type=float, default=4.0, help="address space per worker")
    p.add_argument("--report", default=os.path.join(HERE, "report.json"))
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}; use {', '.join(TARGETS)}")
    summary = {}
    for target in targets:
        jobs = []
        left, k = args.examples, 0
        while left > 0:
            n = min(args.chunk, left)
            jobs.append((target, args.seed * 1_000_003 + k, n))
            left, k = left - n, k + 1
        t0 = time.perf_counter()
        results = []
        # a fresh process per chunk (max_tasks_per_child=1): Hypothesis and caches start clean
        with ProcessPoolExecutor(
            args.workers, max_tasks_per_child=1, initializer=init_worker, initargs=(args.memory_gb,)
        ) as ex:
            futs = [ex.submit(run_chunk, *job, args.timeout) for job in jobs]
            for f in as_completed(futs):
                results.append(f.result())
                done = sum(r["inputs"] for r in results)
                print(f"\r{target}: {done}/{args.examples} inputs", end="", file=sys.stderr)
        print(file=sys.stderr)
        wall = time.perf_counter() - t0
        outcomes: collections.Counter = collections.Counter()
        for r in results:
            outcomes.update(r["outcomes"])
        s = {
            "inputs": sum(r["inputs"] for r in results),
            "wall_seconds": round(wall, 1),
            "cpu_seconds_in_targets": round(sum(r["seconds"] for r in results), 1),
            "inputs_per_second": round(sum(r["inputs"] for r in results) / wall, 1),
            "outcomes": dict(outcomes.most_common()),
            "findings": sorted({f for r in results for f in r["findings"]}),
            "slowest_input_s": round(max(r["slowest_s"] for r in results), 3),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results)),
        }
        summary[target] = s
        print(json.dumps({target: s}, indent=2))
    summary["_run"] = {
        "argv": sys.argv,
        "python": platform.python_version(),
        "workers": args.workers,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with open(args.report, "w") as fh:
        json.dump(summary, fh, indent=2)
    return 1 if any(summary[t]["findings"] for t in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
