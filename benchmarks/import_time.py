"""What a CLI process imports, and how long that takes: ``python -X importtime``, side by side.

Runs one command (default: a warm ``extract`` of one imagewoof class with lite0, one view) in
fresh processes under ``-X importtime``, once per ``--src`` source tree, alternating for
``--rounds``; reports the total import time (sum over top-level modules), the wall time of the
process, and the cumulative import time (median) of the heavy packages (timm, torch, torchvision,
sklearn, openvino, onnxruntime) where they were imported at all.

    python benchmarks/import_time.py --cache /work/bench/cache --src /work/main/src --src src
    python benchmarks/import_time.py --cache C --src src -- predict MODEL photo.jpg -q
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import SHARED_DATA, cpu_flags, today, write_results

HEAVY = ("timm", "torch", "torchvision", "sklearn", "openvino", "onnxruntime")
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def measure(src: Path, cmd: list[str]) -> tuple[float, float, dict[str, float]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "stackvision.cli", *cmd],
                       capture_output=True, text=True, env=env)  # fmt: skip
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(cmd)}\n{p.stderr[-2000:]}")
    total, heavy = 0, {}
    for m in LINE.finditer(p.stderr):
        cumulative, indent, name = int(m.group(2)), len(m.group(3)), m.group(4)
        if indent == 1:  # a top-level import
            total += cumulative
        if name in HEAVY:
            heavy[name] = max(heavy.get(name, 0), cumulative) / 1e6
    return total / 1e6, wall, heavy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append", help="source tree (repeatable; default: src)")
    ap.add_argument("--cache", required=True, help="feature cache with the engines (and features)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "import_time.md"))
    ap.add_argument("cmd", nargs="*", help="the CLI command after --")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    srcs = [Path(s).resolve() for s in (args.src or [str(root / "src")])]
    data = Path(SHARED_DATA) / "imagewoof" / "val" / "n02086240"
    cmd = args.cmd or ["extract", str(data), "--backbones", "lite0", "--tta", "none", "-q"]
    cmd = [*cmd, "--cache", args.cache]
    res: dict[Path, list] = {s: [] for s in srcs}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for s in srcs:
            res[s].append(measure(s, cmd))
            total, wall, heavy = res[s][-1]
            print(f"{s}: imports {total:.2f} s, process {wall:.2f} s, heavy {heavy}", flush=True)
    rows = []
    for s in srcs:
        imp = statistics.median(r[0] for r in res[s])
        wall = statistics.median(r[1] for r in res[s])
        names = sorted(set().union(*(r[2] for r in res[s])))
        heavy = {k: statistics.median(r[2].get(k, 0.0) for r in res[s]) for k in names}
        listed = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(heavy.items())) or "none"
        rows.append(f"| `{s}` | {imp:.2f} | {wall:.2f} | {listed} |")
    text = f"""## Start-up imports (`python -X importtime`)

- Date: {today()}; machine: {cpu_flags()}; 1-min load average {load0:.1f} at start
- Command: `python -X importtime -m stackvision.cli {shlex.join(cmd)}` (fresh process each,
  {args.rounds} alternating rounds, median); the engine folder holds the compiled export
- Script: `python benchmarks/import_time.py {shlex.join(sys.argv[1:])}`

| source tree | imports (s) | whole process (s) | heavy packages imported (cumulative import s) |
| --- | ---: | ---: | --- |
{chr(10).join(rows)}
"""
    write_results(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
