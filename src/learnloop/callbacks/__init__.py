"""Built-in callbacks, one module per concern."""

from .core import Callback
from .device import DeviceCB
from .gather import GatherPredsCB
from .metrics import Accuracy, MetricsCB
from .progress import ProgressCB
from .recorder import Recorder

__all__ = [
    "Accuracy",
    "Callback",
    "DeviceCB",
    "GatherPredsCB",
    "MetricsCB",
    "ProgressCB",
    "Recorder",
]
