"""verl's own ``RewardLoopWorker`` in a process of its own, for tests/test_verl_reward_loop.py.

Each harness process builds one or more ``RewardLoopWorker`` s from the test's OmegaConf
config (as a Ray actor would, minus Ray) and runs what verl's callers run on them: the
batch path's ``compute_score_batch(chunk)``, or the agent loop's streaming
``compute_score(one sample)`` calls, concurrently, each after the delay it is given.
"""

from __future__ import annotations

import asyncio
from typing import Any

_workers: list[Any] = []


def init(config: Any, count: int) -> None:
    """Process initializer: ``count`` reward-loop workers built from ``config``."""
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    _workers.extend(RewardLoopWorker(config) for _ in range(count))


def compute_score_batch(worker: int, chunk: Any) -> list[dict[str, Any]]:
    """verl's batch path on one worker: ``compute_score_batch`` of a chunk."""
    return asyncio.run(_workers[worker].compute_score_batch(chunk))


def compute_score_stream(worker: int, arrivals: list[tuple[float, Any]]
                         ) -> list[dict[str, Any]]:
    """verl's streaming path: each one-sample ``DataProto`` after its delay, concurrently."""
    async def one(delay: float, sample: Any) -> dict[str, Any]:
        await asyncio.sleep(delay)
        result: dict[str, Any] = await _workers[worker].compute_score(sample)
        return result

    async def run() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(d, s) for d, s in arrivals)))

    return asyncio.run(run())
