"""rewardq: distributed LLM-judge reward scoring for RL training.

The front door: what a trainer imports and catches comes from here, or from a documented
submodule (the trainer adapters in :mod:`rewardq.integrations`)::

    from rewardq import RewardClient, Settings, ScoreItem, NoWorkersError

Every name below is imported on first use (PEP 562): ``import rewardq`` loads none of the
client stack, so ``rewardq --help`` starts at once and a worker process, which imports
``rewardq.workers``, never loads the trainer side (torch, the adapters).

The components: ``rewardq.broker`` (the wire contract: settings, schemas, errors, keys),
``rewardq.judge`` (the judge domain: prompts, rubrics, verdicts), ``rewardq.producer``
(the trainer's side: clients, length penalties, the reward formula), ``rewardq.workers``
(the Celery fleet), ``rewardq.gateway`` (the HTTP reward service), ``rewardq.monitoring``
and ``rewardq.judge_server`` (the local stand-in for an OpenAI-compatible judge). The rest
of this package is the console script and the local stack it starts.
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
    from rewardq.broker.dead_letters import DeadLetters
    from rewardq.broker.errors import (
        BrokerUnavailableError,
        ChunksLostError,
        ConfigError,
        InvalidItemError,
        JudgeError,
        NoWorkersError,
        RedisFullError,
        RewardqError,
        ScoringTimeoutError,
    )
    from rewardq.broker.schemas import ResultStatus, ScoreItem, ScoreResult
    from rewardq.broker.settings import Settings
    from rewardq.producer.async_client import AsyncRewardClient
    from rewardq.producer.client import PendingScores, RewardClient
    from rewardq.producer.config import LengthPenaltyConfig
    from rewardq.producer.sync_judge import SyncJudge

#: Each public name and the module it is imported from on first use.
_HOMES = {
    # clients
    "RewardClient": "rewardq.producer.client",
    "PendingScores": "rewardq.producer.client",
    "AsyncRewardClient": "rewardq.producer.async_client",
    "SyncJudge": "rewardq.producer.sync_judge",
    "DeadLetters": "rewardq.broker.dead_letters",
    # settings and the wire types
    "Settings": "rewardq.broker.settings",
    "LengthPenaltyConfig": "rewardq.producer.config",
    "ScoreItem": "rewardq.broker.schemas",
    "ScoreResult": "rewardq.broker.schemas",
    "ResultStatus": "rewardq.broker.schemas",
    # errors
    "RewardqError": "rewardq.broker.errors",
    "ConfigError": "rewardq.broker.errors",
    "InvalidItemError": "rewardq.broker.errors",
    "BrokerUnavailableError": "rewardq.broker.errors",
    "RedisFullError": "rewardq.broker.errors",
    "ScoringTimeoutError": "rewardq.broker.errors",
    "NoWorkersError": "rewardq.broker.errors",
    "ChunksLostError": "rewardq.broker.errors",
    "JudgeError": "rewardq.broker.errors",
}

__all__ = [
    "AsyncRewardClient", "BrokerUnavailableError", "ChunksLostError", "ConfigError",
    "DeadLetters", "InvalidItemError", "JudgeError", "LengthPenaltyConfig", "NoWorkersError",
    "PendingScores", "RedisFullError", "ResultStatus", "RewardClient", "RewardqError",
    "ScoreItem", "ScoreResult", "ScoringTimeoutError", "Settings", "SyncJudge",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rewardq' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
