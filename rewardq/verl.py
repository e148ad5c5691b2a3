"""The module path verl configs name: ``pkg://rewardq.verl``.

It re-exports verl >= 0.7's adapter, :mod:`rewardq.integrations.verl`, so both of its
entry points keep this path::

    reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://rewardq.verl
    reward.reward_manager.name=RewardqRewardManager

    reward.custom_reward_function.path=pkg://rewardq.verl
    reward.custom_reward_function.name=compute_score
"""

from __future__ import annotations

from rewardq.integrations.verl import (
    EXTRA_KEYS,
    RewardqRewardManager,
    VerlOptions,
    compute_score,
)

__all__ = ["EXTRA_KEYS", "RewardqRewardManager", "VerlOptions", "compute_score"]
