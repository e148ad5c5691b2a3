"""What the local judge has seen: the counters behind ``GET /stats``.

They are the evidence the system tests and benchmarks read: ``max_ok_per_prompt`` proves
no prompt was judged twice, ``max_in_flight`` that a worker really holds hundreds of calls
open, ``max_requests_in_any_1s`` that a fleet-wide rate limit held. Every update is O(1)
amortised: running maxima instead of scans, a deque of arrival times for the 1 s window,
and one counter pair per prompt keyed by a 16-byte digest of the user message.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from hashlib import blake2b
from typing import Any

ONE_SECOND = 1.0
#: Requests ``GET /requests`` remembers, and how much of each user message.
RECENT_REQUESTS = 4096
RECENT_CHARS = 2000


class PromptTally:
    """Requests and scored answers for one distinct prompt, in one reset generation."""

    __slots__ = ("generation", "requests", "ok")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.requests = 0
        self.ok = 0


class JudgeStats:
    """Counters of one judge server since start or the last :meth:`reset`.

    ``clock`` is a monotonic clock in seconds (injectable so the window logic can be
    tested without sleeping).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = time.monotonic()
        self._generation = 0
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter; requests in flight stay counted in ``in_flight``.

        A request that arrived before the reset and is answered after it counts in
        ``responses_by_status`` but not towards any prompt's tally.
        """
        self._generation += 1
        self.requests_total = 0
        self.responses_by_status: Counter[str] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.rpm_rejections = 0
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self._prompts: dict[bytes, PromptTally] = {}
        self.max_requests_per_prompt = 0
        self.max_ok_per_prompt = 0
        self._arrivals: deque[float] = deque()
        self.max_requests_in_any_1s = 0
        self.max_in_flight = self.in_flight
        #: the latest requests: model, first line of the user message ("title"), the message
        self.recent: deque[dict[str, str]] = deque(maxlen=RECENT_REQUESTS)

    def arrived(self) -> None:
        """Count a chat-completions request on arrival."""
        self.requests_total += 1
        now = self._clock()
        arrivals = self._arrivals
        arrivals.append(now)
        # The window (now - 1 s, now]: the most arrivals in any 1 s span always ends at
        # an arrival, so checking at each arrival finds the maximum over all windows.
        horizon = now - ONE_SECOND
        while arrivals[0] <= horizon:
            arrivals.popleft()
        if len(arrivals) > self.max_requests_in_any_1s:
            self.max_requests_in_any_1s = len(arrivals)

    def tally(self, user_message: str) -> PromptTally:
        """Count a request for ``user_message``; returns that prompt's tally."""
        key = blake2b(user_message.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        tally = self._prompts.get(key)
        if tally is None:
            tally = self._prompts[key] = PromptTally(self._generation)
        tally.requests += 1
        if tally.requests > self.max_requests_per_prompt:
            self.max_requests_per_prompt = tally.requests
        return tally

    def record(self, model: str, user_message: str) -> None:
        """Remember a request: which model it asked for and which instructions it sent
        (tests read them back to see which rubric each item was judged by)."""
        self.recent.append({"model": model, "title": user_message.partition("\n")[0][:200],
                            "user": user_message[:RECENT_CHARS]})

    def started(self) -> None:
        """A request is now being handled."""
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def finished(self) -> None:
        """A request being handled has been answered (or abandoned)."""
        self.in_flight -= 1

    def answered(self, status: int | str) -> None:
        """Count one response by its HTTP status (or ``"499"``: the client had gone)."""
        self.responses_by_status[str(status)] += 1

    def judged(self, tally: PromptTally, prompt_tokens: int, completion_tokens: int,
               *, scored: bool) -> None:
        """Count a 200 answer delivered; ``scored`` is false for a malformed reply."""
        self.prompt_tokens_total += prompt_tokens
        self.completion_tokens_total += completion_tokens
        if scored and tally.generation == self._generation:
            tally.ok += 1
            if tally.ok > self.max_ok_per_prompt:
                self.max_ok_per_prompt = tally.ok

    def fault(self, kind: str) -> None:
        """Count an injected fault of ``kind``."""
        self.faults_injected[kind] += 1

    def rpm_rejected(self) -> None:
        """Count a request refused by the ``rpm_limit`` window."""
        self.rpm_rejections += 1

    def snapshot(self) -> dict[str, Any]:
        """All counters as JSON-ready values (what ``GET /stats`` returns).

        - ``requests_total``: chat-completions requests received;
        - ``responses_by_status``: ``"200"``, ``"429"``, ... -> count; ``"499"`` counts
          answers whose client had already hung up (e.g. a ``timeout`` fault);
        - ``unique_prompts``: distinct user-message contents;
        - ``max_requests_per_prompt``: most requests for any one prompt;
        - ``max_ok_per_prompt``: most delivered 200 answers *carrying a score* for any one
          prompt (a ``malformed`` reply judges nothing): 1 proves nothing was judged twice;
        - ``max_requests_in_any_1s``: most arrivals within any sliding 1 s window;
        - ``in_flight`` / ``max_in_flight``: requests being handled now / at the peak;
        - ``prompt_tokens_total`` / ``completion_tokens_total``: usage of delivered 200s;
        - ``faults_injected``: fault kind -> count; ``rpm_rejections``: 429s by ``rpm_limit``;
        - ``uptime_s``: since the server started; ``process_cpu_s``: the server process's
          CPU time (never reset: benchmarks take differences).
        """
        return {
            "requests_total": self.requests_total,
            "responses_by_status": dict(self.responses_by_status),
            "unique_prompts": len(self._prompts),
            "max_requests_per_prompt": self.max_requests_per_prompt,
            "max_ok_per_prompt": self.max_ok_per_prompt,
            "max_requests_in_any_1s": self.max_requests_in_any_1s,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "prompt_tokens_total": self.prompt_tokens_total,
            "completion_tokens_total": self.completion_tokens_total,
            "faults_injected": dict(self.faults_injected),
            "rpm_rejections": self.rpm_rejections,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "process_cpu_s": round(time.process_time(), 4),
        }
