"""Per-example signals: the closed forms, capture from a LightningModule, and their store over the pool."""

from .capture import SignalCaptureError, SignalExtractor
from .closed_form import causal_lm_signals, classification_signals
from .store import SignalStore
from .types import ExampleSignals

__all__ = [
    "ExampleSignals",
    "SignalExtractor",
    "SignalCaptureError",
    "SignalStore",
    "classification_signals",
    "causal_lm_signals",
]
