"""``stackvision backbones``: list the backbone registry.

List backbones: name, input size, feature dim, weights source, offline-ready.
"""

from __future__ import annotations

import json

from ..display import table


def add_arguments(b) -> None:
    b.add_argument(
        "names", nargs="*", help="only these backbones (e.g. lite0 timm:resnet50.a1_in1k)"
    )
    b.add_argument("--json", action="store_true", help="machine-readable output with preprocessing")


def run(args) -> int:
    from ...backbones import list_backbones, resolve
    from ...readout import expand_named

    names = expand_named(args.names)  # lite0@256+gem+mid2, fine-grained
    specs = [resolve(n) for n in names] if names else list_backbones()
    rows = [
        {
            "name": s.name,
            "architecture": s.architecture,
            "input": s.preprocess.input_size,
            "dim": s.feature_dim,
            "source": s.source,
            "offline-ready": "yes" if s.offline_ready else "no",
        }
        for s in specs
    ]
    if args.json:
        print(
            json.dumps(
                [{**r, "preprocess": s.preprocess.to_dict()} for r, s in zip(rows, specs)], indent=2
            )
        )
    else:
        print(table(rows, ["name", "architecture", "input", "dim", "source", "offline-ready"]))
        print(
            "\nAny timm model works as timm:<name>; weights download when online or come from "
            "--weights NAME=PATH."
        )
    return 0
