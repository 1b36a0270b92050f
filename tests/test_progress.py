"""Progress where there is no terminal: plain lines (done/total, rate, ETA), at most every 10%."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from stackvision.progress import LogLines, progress

from .conftest import ROOT


def test_log_lines_are_throttled_to_every_ten_percent():
    out = io.StringIO()
    p = LogLines(1000, "extract lite0", "img", stream=out, every=3600)
    for _ in range(1000):
        p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 100, 200, ... 1000
    assert re.fullmatch(
        r"extract lite0: 1,000/1,000 img \(100%\), [\d.]+ img/s, ETA 0 s", lines[-1]
    ), lines[-1]


def test_no_terminal_means_lines_and_quiet_means_nothing():
    assert isinstance(progress(10, "x", enabled=True), LogLines)  # pytest captures stderr
    assert not isinstance(progress(10, "x", enabled=False), LogLines)


def test_extract_writes_progress_lines_to_a_log(woof_val, tmp_path):
    """`stackvision extract ... 2> log`: the log says how much there is and how far it got."""
    p = subprocess.run(
        [sys.executable, "-m", "stackvision.cli", "extract", str(woof_val), "--backbones",
         "lite0", "--tta", "none", "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "extract: 24 image(s) x 1 view(s) to compute through lite0; 0 from the cache" in p.stderr
    assert re.search(r"extract lite0: 24/24 img \(100%\), [\d.]+ img/s, ETA 0 s", p.stderr)
    assert "passes/s" in p.stdout


def test_a_delayed_reporter_says_nothing_about_a_job_done_in_time():
    out = io.StringIO()
    p = LogLines(100, "hash", "file", stream=out, every=3600, delay=3600)
    for _ in range(100):
        p.update(1)
    p.close()
    assert out.getvalue() == ""  # hashing 100 files in a blink: no lines in the log
    assert isinstance(progress(10, "x", delay=5.0), LogLines)  # still lines once it lasts


def test_hashing_reports_progress_before_extraction(woof_val, tmp_path, monkeypatch, capsys):
    """Hashing (step 1 of extraction, minutes for 13k files on a slow disk) has its own lines
    once it lasts longer than HASH_DELAY (0 here, so 24 files are enough to see them)."""
    import stackvision.extract as extract_mod
    from stackvision.cli import main

    monkeypatch.setattr(extract_mod, "HASH_DELAY", 0.0)
    args = ["extract", str(woof_val), "--backbones", "lite0", "--tta", "none"]
    assert main([*args, "--cache", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    hashing = [line for line in err.splitlines() if line.startswith("hash: ")]
    assert 1 <= len(hashing) <= 12  # at most one per ~10% (24 files: a line every 2)
    assert re.fullmatch(r"hash: 24/24 file \(100%\), [\d.]+ file/s, ETA 0 s", hashing[-1])
    assert err.index(hashing[-1]) < err.index("extract: 24 image(s) x 1 view(s)")
    # -q: nothing at all
    assert main([*args, "--cache", str(tmp_path / "cache"), "--device", "cpu", "-q"]) == 0
    assert "hash: " not in capsys.readouterr().err
