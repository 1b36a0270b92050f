"""stackvision: fine-grained image classification by stacking pretrained models."""

__version__ = "0.1.0"

from .classifier import Predictions, StackedClassifier  # noqa: E402
from .errors import StackvisionError  # noqa: E402

__all__ = ["StackedClassifier", "Predictions", "StackvisionError", "__version__"]
