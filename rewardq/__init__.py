"""rewardq: distributed LLM-judge reward scoring for RL training.

The components live in the top-level packages ``broker`` (the shared contract),
``workers`` (the Celery fleet), ``producer`` (what a trainer imports), ``monitoring``
and ``judge_server`` (the local stand-in for an OpenAI-compatible judge). This package
is the console script and the local stack that ``rewardq demo`` and ``bench`` start.
"""

from broker.schemas import ResultStatus, ScoreItem, ScoreResult
from broker.settings import Settings
from producer.async_client import AsyncRewardClient
from producer.client import PendingScores, RewardClient

__all__ = ["AsyncRewardClient", "PendingScores", "ResultStatus", "RewardClient", "ScoreItem",
           "ScoreResult", "Settings"]
