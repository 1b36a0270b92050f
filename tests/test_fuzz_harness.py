"""The fuzz harness (``make fuzz``) stays runnable: a few inputs of every target, no finding.

The real runs (10^5 inputs per target) are not part of the test suite; BENCHMARKS.md has them.
"""

from __future__ import annotations

import sys

import pytest

from .conftest import ROOT

pytest.importorskip("hypothesis")
sys.path.insert(0, str(ROOT))  # the fuzz/ package lives beside src/

from fuzz.run import TARGETS, run_chunk  # noqa: E402


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_runs_without_findings(target):
    r = run_chunk(target, seed=1, n=60, timeout=20)
    assert r["inputs"] >= 60 and not r["findings"], r
    assert sum(n for k, n in r["outcomes"].items() if not k.startswith("FINDING")) == r["inputs"]


# Inputs `make fuzz` found against the code before issue 11 (labels with control characters and
# ids leading out of the images folder were accepted); each is a clean user error now.
OLD_FINDINGS = [
    b'\xef\xbb\xbf"id","label"\r\n"/etc/passwd","golden retriever"\r\n',
    b"\xef\xbb\xbfpath,y\nsub/../../outside,Shih-Tzu\nc d,Shih-Tzu\nb,golden retriever\n",
    b"id, label\r\nsub/e, \x7f\x0b/.c0\x019\r\n",
]


@pytest.mark.parametrize("data", OLD_FINDINGS)
def test_csv_inputs_found_by_the_fuzzer_are_clean_errors(data, tmp_path):
    from fuzz.targets import CsvWorkspace, csv_target

    assert csv_target(CsvWorkspace(str(tmp_path)), data, None, None, False) == "StackvisionError"
