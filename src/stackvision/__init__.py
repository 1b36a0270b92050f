"""stackvision: fine-grained image classification by stacking pretrained models."""

__version__ = "0.1.0"

from .errors import StackvisionError  # noqa: E402

__all__ = [
    "StackedClassifier",
    "load_model",
    "Predictions",
    "Runtime",
    "StackvisionError",
    "__version__",
]

# The model classes import scikit-learn; load them on first use so `import stackvision.cli`
# (every command line) stays quick.
_LAZY = {
    "StackedClassifier": "classifier",
    "Predictions": "base",
    "Runtime": "runtime",
    "load_model": "models",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stackvision' has no attribute {name!r}")
