"""Import OpenVINO and NNCF without their usage telemetry.

Both send usage events to Google Analytics by default (``openvino-telemetry`` with
``enable_opt_in_dialog=False``): OpenVINO on ``import openvino`` (since 2024.1), NNCF when it
quantises. Only an opt-out file in the user's home or a ``CI`` variable stops them, and each
import also writes ``~/intel/stats``. stackvision promises no network traffic at run time
beyond an explicit weights download, so it imports them with ``openvino_telemetry`` hidden:
each falls back to its own no-op stub, as it does when that package is not installed. Nothing
in the user's home is changed, and the hiding ends with the import, so code that imports
``openvino_telemetry`` itself later is not affected. ``STACKVISION_OPENVINO_TELEMETRY=1``
leaves OpenVINO's and NNCF's defaults as they are.
"""

from __future__ import annotations

import contextlib
import os
import sys

ENV = "STACKVISION_OPENVINO_TELEMETRY"
_MODULE = "openvino_telemetry"


@contextlib.contextmanager
def hidden():
    """Within the block, ``import openvino_telemetry`` raises ImportError (unless it was imported
    before, or ``STACKVISION_OPENVINO_TELEMETRY=1``)."""
    hide = os.environ.get(ENV) != "1" and _MODULE not in sys.modules
    if hide:
        sys.modules[_MODULE] = None  # the import system's "not importable" marker
    try:
        yield
    finally:
        if hide and _MODULE in sys.modules and sys.modules[_MODULE] is None:
            del sys.modules[_MODULE]


def import_openvino():
    """``import openvino``, without its telemetry."""
    with hidden():
        import openvino
    return openvino


def import_nncf():
    """``import nncf`` (which imports OpenVINO), without either's telemetry."""
    with hidden():
        import nncf
    return nncf
