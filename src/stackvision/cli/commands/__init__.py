"""One module per verb: its docstring is its help, ``add_arguments(parser)`` its options,
``run(args)`` carries it out.

The order of ``VERBS`` is the order of ``stackvision --help``.
"""

VERBS = [
    "backbones",
    "extract",
    "train",
    "doctor",
    "predict",
    "evaluate",
    "info",
    "finetune",
    "augment_preview",
    "ensemble",
    "export",
    "serve",
]
