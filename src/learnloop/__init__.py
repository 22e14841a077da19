"""learnloop: a small, fast, callback-driven training loop for PyTorch."""

from .callbacks.compile import CompileCB
from .callbacks.core import Callback
from .callbacks.debug import LimitBatchesCB, SingleBatchCB
from .callbacks.device import DeviceCB, default_device, to_device
from .callbacks.distributed import DistributedCB, is_main_process, rank, world_size
from .callbacks.gather import GatherPredsCB
from .callbacks.hooks import ActivationStatsCB, Hook, Hooks
from .callbacks.loggers import CSVLoggerCB, TensorBoardCB
from .callbacks.lr_finder import LRFinderCB, LRFindResult
from .callbacks.metrics import Accuracy, MetricsCB
from .callbacks.progress import ProgressCB
from .callbacks.recorder import Recorder
from .callbacks.schedule import BatchSchedCB, EpochSchedCB, OneCycle
from .callbacks.tracking import (
    CheckpointCB,
    EarlyStoppingCB,
    StopReason,
    TerminateOnNaNCB,
)
from .callbacks.training import GradAccumCB, GradClipCB, MixedPrecisionCB
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
    "ActivationStatsCB",
    "BatchSchedCB",
    "CSVLoggerCB",
    "Callback",
    "CancelBackwardException",
    "CancelBatchException",
    "CancelEpochException",
    "CancelException",
    "CancelFitException",
    "CancelStepException",
    "CancelTrainException",
    "CancelValidException",
    "CheckpointCB",
    "CompileCB",
    "DataLoaders",
    "DeviceCB",
    "DistributedCB",
    "EarlyStoppingCB",
    "EpochSchedCB",
    "GatherPredsCB",
    "GradAccumCB",
    "GradClipCB",
    "Hook",
    "Hooks",
    "LRFindResult",
    "LRFinderCB",
    "Learner",
    "LimitBatchesCB",
    "MetricsCB",
    "MixedPrecisionCB",
    "OneCycle",
    "ProgressCB",
    "Recorder",
    "SingleBatchCB",
    "StopReason",
    "TensorBoardCB",
    "TerminateOnNaNCB",
    "collate_dict",
    "default_device",
    "inplace",
    "is_main_process",
    "rank",
    "to_device",
    "world_size",
]
