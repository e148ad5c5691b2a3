"""The trainer adapters: rewardq inside a trainer's reward step.

- :mod:`rewardq.integrations.verl`: verl >= 0.7's reward loop (``RewardqRewardManager``,
  and ``compute_score`` for verl's own managers); verl configs name it by
  ``pkg://rewardq.verl``, which re-exports it;
- :mod:`rewardq.integrations.verl_batch`: verl <= 0.6's batch reward manager
  (``LengthPenaltyRewardManager``);
- :mod:`rewardq.integrations.trl`: TRL reward functions (``make_trl_reward``,
  ``make_async_trl_reward``, ``make_sync_trl_reward``).

Every adapter computes the reward of :mod:`rewardq.producer.rewards` and asks the judge
through :mod:`rewardq.integrations.judging` (a bad sample fails alone, identical samples
are judged once). The HTTP reward protocols of OpenRLHF and slime are served by
``rewardq.gateway``. Importing this package loads none of the adapters (nor torch).
"""
