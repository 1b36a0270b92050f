"""stackvision: fine-grained image classification by stacking pretrained models."""

__version__ = "0.1.0"

from .classifier import Predictions, StackedClassifier  # noqa: E402
from .errors import StackvisionError  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = ["StackedClassifier", "load_model", "Predictions", "StackvisionError", "__version__"]
