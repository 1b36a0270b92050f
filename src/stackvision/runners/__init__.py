"""Runners: where feature extraction runs. ``local`` is :func:`stackvision.extract.extract` (threads
and one process); ``ray`` is :mod:`stackvision.runners.ray_runner` (Ray Data tasks and actors, from
one machine to a cluster). Both read and write the same feature cache, so either one can finish a
run the other started. Ray is imported only when the ``ray`` runner is used.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..backbones import BackboneSpec
from ..errors import StackvisionError

RUNNERS = ("local", "ray")


def extract_features(
    paths: Sequence[str],
    specs: Sequence[BackboneSpec],
    *,
    runner: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    **kwargs,
):
    """Dispatch to the local runner or the Ray runner; same arguments, same :class:`Features`.

    ``kwargs`` are those of :func:`stackvision.extract.extract` (views, pool, cache, engine,
    precision, device, batch_size, workers, decoder, strict, progress, assemble).
    """
    if runner not in RUNNERS:
        raise StackvisionError(f"unknown runner '{runner}'", f"use one of: {', '.join(RUNNERS)}")
    if runner == "local":
        if ray_address or ray_actors:
            raise StackvisionError(
                "--ray-address and --ray-actors only apply to the Ray runner", "add --runner ray"
            )
        from ..extract import extract

        return extract(paths, specs, **kwargs)
    if kwargs.pop("decoder", "auto") == "torchvision":
        raise StackvisionError(
            "--decoder torchvision is not available with the Ray runner (its tasks decode "
            "with PIL)",
            "use --runner local for torchvision decoding, or leave --decoder at auto",
        )
    if kwargs.get("precision", "fp32") == "int8":
        raise StackvisionError(
            "precision int8 is not available with the Ray runner",
            "use --precision fp32, or --runner local for int8",
        )
    from .ray_runner import extract_ray

    return extract_ray(paths, specs, ray_address=ray_address, actors=ray_actors, **kwargs)
