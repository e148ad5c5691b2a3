"""Fault injection: which requests fail, how, and how long each one takes.

One seeded generator draws both the latency jitter and the faults, so a run with the
same seed and the same arrival order fails the same requests the same way. The fault
kinds mimic what a hosted LLM API does under stress:

- ``"429"``: rate limited, with ``Retry-After`` (answered at once);
- ``"500"``: internal server error (after the usual latency);
- ``"503"``: overloaded (after the usual latency);
- ``"400"``: invalid request (answered at once; a permanent error);
- ``"401"``: invalid API key (answered at once; a permanent error);
- ``"timeout"``: stalls ``timeout_sleep_s``, then answers normally, so a client with a
  shorter timeout gives up first (the server records such an answer as status 499);
- ``"malformed"``: a 200 whose content holds no score ("I cannot grade this response.").
"""

from __future__ import annotations

import random

from rewardq.judge_server.config import JudgeConfig

#: Faults a gateway answers before the model runs: no latency.
IMMEDIATE_FAULTS = frozenset({"429", "400", "401"})


class FaultInjector:
    """Draws each request's fault and latency from a generator seeded with ``seed``.

    ``POST /admin/config`` with a ``seed`` builds a new injector, so a test can replay a
    reproducible sequence by setting the same seed again.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def draw_fault(self, config: JudgeConfig) -> str | None:
        """The fault to inject into this request, or ``None`` (with ``1 - error_rate``)."""
        if config.error_rate <= 0.0:
            return None
        rng = self._rng
        if config.error_rate < 1.0 and rng.random() >= config.error_rate:
            return None
        kinds = config.error_kinds
        return kinds[0] if len(kinds) == 1 else rng.choice(kinds)

    def latency_s(self, config: JudgeConfig) -> float:
        """Seconds this request "thinks": ``latency_ms ± jitter_ms``, never negative."""
        latency = config.latency_ms
        if config.jitter_ms > 0.0:
            latency += self._rng.uniform(-config.jitter_ms, config.jitter_ms)
        return max(latency, 0.0) / 1000.0
