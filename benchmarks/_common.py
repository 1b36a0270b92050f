"""Shared bits of the benchmarks: machine description and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def machine() -> str:
    """CPU model, cores, RAM and the GPU (or "no GPU")."""
    gpu = _gpu()
    return f"{cpu_description()}, " + (f"GPU {gpu}" if gpu else "no GPU")


def cpu_description() -> str:
    """CPU model (from lscpu), cores and RAM."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except Exception:
        model = platform.processor() or "unknown CPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"


def cpu_flags() -> str:
    """Vendor, model, family and the vector flags that matter to the engines (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            first = fh.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or "unknown CPU"
    info = dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in first.splitlines())
    )
    flags = set(info.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]
    have = [f for f in wanted if f in flags] or ["no AVX-512"]
    return (
        f"{info.get('vendor_id', '?')} {info.get('model name', '?')} (family "
        f"{info.get('cpu family', '?')}), {os.cpu_count()} cores, flags {' '.join(have)}"
    )


def _gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def today() -> str:
    return dt.date.today().isoformat()


def write_section(name: str, body: str, path: str | None = None) -> str:
    """Replace (or append) the section between markers ``<!-- name -->`` in BENCHMARKS.md."""
    path = path or os.path.join(ROOT, "BENCHMARKS.md")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = "# Benchmarks\n\n"
    if os.path.exists(path):
        with open(path) as fh:
            text = fh.read()
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def write_results(path: str, text: str) -> None:
    """A benchmark's results file (its folder made), and the same text on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    print(text)


def cold_extract_seconds(paths, specs, views, engines: str) -> float:
    """Seconds to extract ``paths`` through ``specs`` for ``views`` into a fresh feature cache
    that links the warm engine folder ``engines`` (in-loop; the cache is removed after)."""
    import shutil
    import tempfile

    from stackvision.cache import FeatureCache
    from stackvision.extract import extract

    d = tempfile.mkdtemp()
    try:
        os.symlink(os.path.abspath(engines), os.path.join(d, "engines"))
        t0 = time.perf_counter()
        extract(paths, specs, views=views, cache=FeatureCache(d))
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(d)


def write_table(path: str, lines: list[str], rows: list[dict]) -> None:
    """A results file: the header ``lines``, then the ``rows`` as a table (printed too)."""
    write_results(path, "\n".join([*lines, "", md_table(rows, list(rows[0]))]))


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
