"""The feature stack's uint8 forward pass (export contract, serving): each backbone's engine on
its own resize of one fixed-size uint8 batch, every view in one engine call, blocks stacked."""

from __future__ import annotations

import numpy as np

from .backbones import BackboneSpec
from .cache import FeatureCache
from .runtime import Runtime


def uint8_features(
    batch: np.ndarray,
    specs: list[BackboneSpec],
    rt: Runtime,
    engines: dict,
    *,
    pool: str,
    precision: str,
    calibration: dict | None,
    n_views: int,
) -> np.ndarray:
    """Stacked features (N, n_views, D) of a checked uint8 RGB batch (N, S, S, 3).

    ``engines`` is the caller's cache of compiled engines, keyed by (backbone, runtime)."""
    from .engines import Calibration, create_engine
    from .export import resize_uint8

    blocks = []
    for spec in specs:
        key = (spec.name, rt)
        if key not in engines:
            engines[key] = create_engine(
                spec,
                pool=pool,
                engine=rt.engine,
                device=rt.device,
                precision=precision,
                cache_dir=FeatureCache(rt.cache_dir).base,
                calibration=Calibration(calibration[spec.name]) if calibration else None,
            )
        pp = spec.preprocess
        x = resize_uint8(batch, pp.input_size, pp.interpolation)
        if pp.channel_order == "BGR":  # engines take the backbone's order (Normalize(pp))
            x = x[..., ::-1]
        # Every view in one engine call (one image + its flip: one batch of 2, not 2 of 1).
        v = np.concatenate([x, x[:, :, ::-1]][:n_views])
        n, bs = len(batch), rt.batch_size * n_views
        parts = [
            engines[key].features(np.ascontiguousarray(v[i : i + bs])) for i in range(0, len(v), bs)
        ]
        f = np.concatenate(parts)
        blocks.append(f.reshape(n_views, n, -1).transpose(1, 0, 2).astype(np.float32))
    return np.concatenate(blocks, axis=-1)
