"""Built-in callbacks, one module per concern; every one of them is exported here."""

from .compile import CompileCB
from .core import ORDERS, Callback, not_an_event
from .debug import LimitBatchesCB, SingleBatchCB
from .device import DeviceCB
from .distributed import DistributedCB
from .gather import GatherPredsCB
from .hooks import ActivationStatsCB, Hook, Hooks
from .loggers import CSVLoggerCB, TensorBoardCB
from .lr_finder import LRFinderCB, LRFindResult
from .metrics import Accuracy, MetricsCB
from .profile_report import PhaseProfile, ProfileReport
from .profiler import ProfileCB
from .progress import ProgressCB
from .recorder import Recorder
from .schedule import BatchSchedCB, EpochSchedCB, OneCycle
from .tracking import CheckpointCB, EarlyStoppingCB, StopReason, TerminateOnNaNCB
from .training import GradAccumCB, GradClipCB, MixedPrecisionCB

__all__ = [
    "ORDERS",
    "Accuracy",
    "ActivationStatsCB",
    "BatchSchedCB",
    "CSVLoggerCB",
    "Callback",
    "CheckpointCB",
    "CompileCB",
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
    "LimitBatchesCB",
    "MetricsCB",
    "MixedPrecisionCB",
    "OneCycle",
    "PhaseProfile",
    "ProfileCB",
    "ProfileReport",
    "ProgressCB",
    "Recorder",
    "SingleBatchCB",
    "StopReason",
    "TensorBoardCB",
    "TerminateOnNaNCB",
    "not_an_event",
]
