"""The ``rpm_limit`` knob: a true sliding 60 s window over accepted requests.

A real judge API refuses requests beyond its per-minute quota with 429 and says when to
come back. Fixed one-minute buckets would let twice the quota through around a bucket
edge, so the window keeps the arrival time of every request it accepted in the last
60 s (a deque: O(1) amortised per request) and answers with how long until the oldest
of them leaves it. Setting ``rpm_limit`` at runtime starts a fresh window (a new quota
from now on), so one test's traffic never eats the next one's quota.
"""

from __future__ import annotations

from collections import deque

WINDOW_S = 60.0


class SlidingWindowLimiter:
    """Admits at most ``limit`` requests in any ``window_s`` seconds."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._accepted: deque[float] = deque()

    def admit(self, limit: int, now: float) -> float | None:
        """Admit a request arriving at ``now`` (monotonic seconds) if the window has room.

        Args:
            limit: requests allowed per window; 0 means unlimited (nothing is recorded).
            now: the arrival time, from a monotonic clock.

        Returns:
            ``None`` when admitted, else the seconds until a slot frees up (> 0).
        """
        if limit <= 0:
            return None
        accepted = self._accepted
        horizon = now - self.window_s
        while accepted and accepted[0] <= horizon:
            accepted.popleft()
        if len(accepted) >= limit:
            # The (len - limit + 1)-th oldest must leave before one more fits.
            oldest_blocking = accepted[len(accepted) - limit]
            return max(oldest_blocking + self.window_s - now, 0.001)
        accepted.append(now)
        return None

    def clear(self) -> None:
        """Forget every accepted request: the next ``limit`` requests are admitted."""
        self._accepted.clear()
