"""learnloop: a small, fast, callback-driven training loop for PyTorch."""

from .callbacks.core import Callback
from .callbacks.device import DeviceCB, default_device, to_device
from .callbacks.distributed import DistributedCB, is_main_process, rank, world_size
from .callbacks.metrics import Accuracy, MetricsCB
from .callbacks.progress import ProgressCB
from .callbacks.recorder import Recorder
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
    "DistributedCB",
    "Learner",
    "MetricsCB",
    "ProgressCB",
    "Recorder",
    "default_device",
    "is_main_process",
    "rank",
    "to_device",
    "world_size",
]
