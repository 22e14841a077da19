"""learnloop: a small, fast, callback-driven training loop for PyTorch."""

import sys as _sys

from .callbacks import (
    ORDERS,
    Accuracy,
    ActivationStatsCB,
    BatchSchedCB,
    Callback,
    CheckpointCB,
    CompileCB,
    CSVLoggerCB,
    DeviceCB,
    DistributedCB,
    EarlyStoppingCB,
    EpochSchedCB,
    GatherPredsCB,
    GradAccumCB,
    GradClipCB,
    Hook,
    Hooks,
    LimitBatchesCB,
    LRFinderCB,
    LRFindResult,
    MetricsCB,
    MixedPrecisionCB,
    OneCycle,
    PhaseProfile,
    ProfileCB,
    ProfileReport,
    ProgressCB,
    Recorder,
    SingleBatchCB,
    StopReason,
    TensorBoardCB,
    TerminateOnNaNCB,
    not_an_event,
)
from .callbacks.device import default_device, to_device
from .data.hf import collate_dict, inplace
from .data.loaders import DataLoaders
from .dist import is_main_process, rank, world_size
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
from .preempt import Preempted

if (
    "ipykernel" in _sys.modules
):  # in Jupyter: no ipywidgets warning from tqdm.auto later
    from .data.quiet import quiet_tqdm_auto

    quiet_tqdm_auto()

__version__ = "0.1.0"

__all__ = [
    "EVENTS",
    "ORDERS",
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
    "PhaseProfile",
    "Preempted",
    "ProfileCB",
    "ProfileReport",
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
    "not_an_event",
    "rank",
    "to_device",
    "world_size",
]
