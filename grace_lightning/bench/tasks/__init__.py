"""Benchmark tasks: name -> :class:`~grace_lightning.bench.tasks.base.BenchTask`.

Each task lives in its own module and is listed in ``_TASK_MODULES``; modules are imported only when their
task is asked for, so a task's optional dependencies never slow down or break another's.
"""

from __future__ import annotations

import importlib

from grace_lightning.bench.tasks.base import BenchModule, BenchTask, TaskData, TaskOption, TaskSize, TaskUnavailable

__all__ = ["BenchModule", "BenchTask", "TaskData", "TaskOption", "TaskSize", "TaskUnavailable", "available_tasks", "get_task"]

# task name -> "module:ClassName"
_TASK_MODULES = {
    "mixture": "grace_lightning.bench.tasks.mixture:MixtureTask",
    "fashion-mnist": "grace_lightning.bench.tasks.fashion_mnist:FashionMNISTTask",
    "fashion-mnist-noisy": "grace_lightning.bench.tasks.fashion_mnist:NoisyFashionMNISTTask",
    "tweets": "grace_lightning.bench.tasks.tweets:TweetsTask",
    "tweets-noisy": "grace_lightning.bench.tasks.tweets:NoisyTweetsTask",
    "shakespeare": "grace_lightning.bench.tasks.shakespeare:ShakespeareTask",
    "lm-mixture": "grace_lightning.bench.tasks.lm_mixture:LMMixtureTask",
    "minilm-tweets": "grace_lightning.bench.tasks.minilm_tweets:MiniLMTweetsTask",
}


def available_tasks() -> list[str]:
    """Names accepted by ``--task``, in a fixed order."""
    return list(_TASK_MODULES)


def get_task(name: str, **options) -> BenchTask:
    """A fresh instance of the task called ``name`` with its ``options`` (``ValueError`` names a bad one)."""
    if name not in _TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    module, cls = _TASK_MODULES[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)
