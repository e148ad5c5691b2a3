"""``StepTiming``: where one reward step's time went, to make the judge overlap visible.

The number that matters to a trainer is ``gpu_wait_s``: how long the step was blocked
waiting for judge scores after its own work (decoding, rule scores, the length penalty
on the device) was done. In the async mode the judge works while the trainer computes,
so the wait is what is left of the judge's wall time; in the sync mode the trainer does
nothing else while the judge answers, so the whole judge wall time is waited.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

JudgeMode = Literal["async", "sync", "off"]


@dataclass(frozen=True)
class StepTiming:
    """Timings of one reward-manager call, in seconds.

    Attributes:
        mode: ``"async"`` (the worker fleet), ``"sync"`` (the in-process judge loop) or
            ``"off"`` (no judge call this step: judge disabled or nothing to judge).
        items: samples in the batch.
        judged: samples sent to the judge.
        submit_s: time spent enqueueing the judge items (async mode; 0 otherwise).
        penalty_s: computing response lengths and the length penalty on the device.
        gpu_wait_s: time the trainer was blocked waiting for judge scores ("GPU wait").
        judge_wall_s: from the start of submitting to the last judge result. In the
            async mode that is when the result backend stored the last chunk's result
            (or, if the backend gave no time, when the trainer had them all in hand).
        total_s: the whole call.
    """

    mode: JudgeMode
    items: int
    judged: int
    submit_s: float
    penalty_s: float
    gpu_wait_s: float
    judge_wall_s: float
    total_s: float

    def as_dict(self) -> dict[str, float | int | str]:
        """The timings as a flat dict (for logs, metrics and the demo's table)."""
        return asdict(self)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device``, so a timer around them measures them.

    A no-op on the CPU; on CUDA it is what makes ``penalty_s`` honest, since kernel
    launches return before the kernels run.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    """The clock every ``StepTiming`` field is read from (monotonic, seconds)."""
    return time.perf_counter()
