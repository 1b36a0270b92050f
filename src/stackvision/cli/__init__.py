"""The command line: ``main`` (the console entry point) and one module per verb in ``commands/``.

The CLI is a thin layer: each verb parses its flags, checks them and its ``--out`` before any
work (:mod:`.options`, :mod:`stackvision.outputs`), calls the library, and prints a summary.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
