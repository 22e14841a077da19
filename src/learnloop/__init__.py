"""learnloop: a small, fast, callback-driven training loop for PyTorch."""

from .callbacks.core import Callback
from .callbacks.device import DeviceCB, default_device, to_device
from .callbacks.metrics import Accuracy, MetricsCB
from .callbacks.progress import ProgressCB
from .callbacks.recorder import Recorder
from .data.hf import collate_dict, inplace
from .data.loaders import DataLoaders
from .events import (
    EVENTS,
    CancelBackwardException,
    CancelBatchException,
    CancelEpochException,
    CancelException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidException,
)
from .learner import Learner

__version__ = "0.1.0"

__all__ = [
    "EVENTS",
    "Accuracy",
    "Callback",
    "CancelBackwardException",
    "CancelBatchException",
    "CancelEpochException",
    "CancelException",
    "CancelFitException",
    "CancelStepException",
    "CancelTrainException",
    "CancelValidException",
    "DataLoaders",
    "DeviceCB",
    "Learner",
    "MetricsCB",
    "ProgressCB",
    "Recorder",
    "collate_dict",
    "default_device",
    "inplace",
    "to_device",
]
