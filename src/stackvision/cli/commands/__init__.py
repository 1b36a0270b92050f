"""One module per verb: ``add_parser(sub)`` registers it, ``run(args)`` carries it out.

The order of ``VERBS`` is the order of ``stackvision --help``.
"""

VERBS = [
    "backbones",
    "extract",
    "train",
    "predict",
    "evaluate",
    "info",
    "finetune",
    "augment_preview",
    "ensemble",
    "export",
    "serve",
]
