"""The ``stackvision`` command: parser assembly and the one place user errors become exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import StackvisionError
from .commands import VERBS
from .options import check_args, max_image_env

EPILOG = "Every verb has --help. Docs: README.md and docs/ in the project."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stackvision",
        description="Fine-grained image classification by stacking pretrained models.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"stackvision {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        module = importlib.import_module(f".commands.{verb}", __package__)
        name, summary, description = _describe(module.__doc__)
        q = sub.add_parser(name, help=summary, description=description)
        module.add_arguments(q)
        q.set_defaults(func=module.run)
    return p


def _describe(doc: str) -> tuple[str, str, str]:
    r"""A verb module's docstring -> (verb, one-line help, description).

    The docstring reads ``\`\`stackvision VERB\`\`: summary.`` then a paragraph for ``--help``.
    """
    head, _, body = doc.strip().partition("\n\n")
    name, _, summary = head.partition("``: ")
    return name.removeprefix("``stackvision "), summary.rstrip("."), " ".join(body.split())


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name prints as its own bytes
        getattr(stream, "reconfigure", lambda **_: None)(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        with max_image_env(args):
            return args.func(args)
    except StackvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `stackvision predict ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(
            "interrupted: finished batches are in the feature cache; run the same command again "
            "to resume",
            file=sys.stderr,
        )
        return 130
