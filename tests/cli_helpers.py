"""Helpers shared by the CLI tests: one-line user errors and a small lite0 training run."""

from __future__ import annotations

from stackvision.cli import main


def one_line_error(capsys, *needles: str) -> str:
    """The captured stderr is one `error: ...` line, no traceback, containing ``needles``."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def train(data, out, cache_dir, *extra) -> int:
    """`stackvision train DATA --out OUT` with lite0, 2 folds, no TTA."""
    return main(
        ["train", str(data), "--out", str(out), "--backbones", "lite0", "--folds", "2"]
        + ["--tta", "none", "--cache", cache_dir, "-q", *map(str, extra)]
    )
