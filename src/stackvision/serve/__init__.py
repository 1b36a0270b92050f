"""The HTTP prediction service: FastAPI on uvicorn, with dynamic batching.

Routes (OpenAPI at ``/docs`` and ``/openapi.json``):

* ``POST /predict``: one or more images, as multipart field ``file`` (repeatable) or JSON
  ``{"images": ["<base64>", ...]}``; answers the top-k classes per image.
* ``GET /model``: classes, backbones, head, metrics, input contract, versions, serving stats.
* ``GET /health``: liveness, request counters (server errors included) and batching counters
  (never needs the API key).
* ``GET /``: a web page to try the model (drop an image, see the top-5 classes). It and ``/docs``
  are static HTML open to all: they ask for the API key and send it as a header from JavaScript,
  never in a URL.

Every image is decoded and prepared in a worker thread (:func:`stackvision.export.prepare_image`,
the same input contract as the ONNX export), then queued. One batching task takes whatever is
queued, waits at most ``max_wait_ms`` for more, up to ``max_batch`` images, and runs a single
forward pass for all of them in the inference thread; concurrent requests therefore share backbone
passes instead of each paying for its own.

Modules: :mod:`.app` (the app, routes, request ids and error accounting), :mod:`.run`
(:func:`serve`: bind, load, run uvicorn),
:mod:`.batching` (:class:`Batcher`), :mod:`.requests` (body formats, limits, image preparation),
:mod:`.auth` (the API key).
"""

from .app import create_app
from .auth import API_KEY_ENV, LOOPBACK
from .batching import Batcher
from .requests import ApiError, Limits
from .run import serve

__all__ = ["API_KEY_ENV", "LOOPBACK", "ApiError", "Batcher", "Limits", "create_app", "serve"]
