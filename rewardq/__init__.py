"""rewardq: distributed LLM-judge reward scoring for RL training.

The components live in the top-level packages ``broker`` (the shared contract),
``workers`` (the Celery fleet), ``producer`` (what a trainer imports), ``monitoring``
and ``judge_server`` (the local stand-in for an OpenAI-compatible judge). This package
is the console script and the local stack that ``rewardq demo`` and ``bench`` start.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("rewardq")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from rewardq.broker.schemas import ResultStatus, ScoreItem, ScoreResult
    from rewardq.broker.settings import Settings
    from rewardq.producer.async_client import AsyncRewardClient
    from rewardq.producer.client import PendingScores, RewardClient

__all__ = ["AsyncRewardClient", "PendingScores", "ResultStatus", "RewardClient", "ScoreItem",
           "ScoreResult", "Settings", "__version__"]

# Imported on first use (PEP 562), so the console script starts without loading the
# client stack: ``rewardq --help`` and ``rewardq stats`` need none of it.
_HOMES = {"AsyncRewardClient": "rewardq.producer.async_client",
          "PendingScores": "rewardq.producer.client",
          "RewardClient": "rewardq.producer.client", "ResultStatus": "rewardq.broker.schemas",
          "ScoreItem": "rewardq.broker.schemas", "ScoreResult": "rewardq.broker.schemas",
          "Settings": "rewardq.broker.settings"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'rewardq' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
