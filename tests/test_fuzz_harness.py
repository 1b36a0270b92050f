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
