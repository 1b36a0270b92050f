"""Thread pools that fight over the cores: numpy's BLAS beside the compiled engines.

A served model alternates between its engines (OpenVINO / ONNX Runtime, which use every core)
and small numpy matrix products (the fold heads: a couple of rows times a 3,840 x C matrix).
OpenBLAS runs those products on its own pool of threads, which keep spinning after each call and
take the cores from the engine's threads that run next. Measured on a 2-core EPYC under load
(default stack, one image): a request took 370 ms with OpenBLAS's default pool and 55 ms with one
BLAS thread. One image's head products gain nothing from more threads, so the server runs BLAS
single-threaded (:func:`limit_blas_threads`); batch prediction (``predict`` on folders, training)
keeps the default.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def limit_blas_threads(n: int = 1) -> bool:
    """Run the BLAS libraries loaded in this process (numpy's OpenBLAS or MKL) on ``n`` threads
    from now on; False when that cannot be done (threadpoolctl missing, no BLAS found)."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return False
    import numpy  # noqa: F401  (loads numpy's BLAS, so threadpoolctl can find it)

    try:
        threadpool_limits(limits=int(n), user_api="blas")
        return any(i.get("user_api") == "blas" for i in threadpool_info())
    except Exception as exc:  # tuning only: never stop a server over it
        log.debug("could not limit BLAS threads: %s", exc)
        return False


def blas_threads() -> list[int]:
    """The thread count of every BLAS library loaded in this process (for tests and /health)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
