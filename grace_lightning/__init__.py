"""grace-lightning: train on a dynamic coreset rebuilt from the live model, as a Lightning callback + sampler."""

from grace_lightning.callback import CoresetCallback
from grace_lightning.sampler import CoresetSampler
from grace_lightning.signals import ExampleSignals, SignalCaptureError, SignalStore
from grace_lightning.strategies import (
    Selection,
    SelectionInput,
    Strategy,
    available_strategies,
    build_strategy,
    register_strategy,
)
from grace_lightning.weights import batch_weights

__version__ = "0.1.0"

__all__ = [
    "CoresetCallback",
    "CoresetSampler",
    "ExampleSignals",
    "Selection",
    "SelectionInput",
    "SignalCaptureError",
    "SignalStore",
    "Strategy",
    "available_strategies",
    "batch_weights",
    "build_strategy",
    "register_strategy",
]
