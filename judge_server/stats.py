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
from collections.abc import Callable, Iterable
from hashlib import blake2b
from typing import Any

ONE_SECOND = 1.0
#: Requests ``GET /requests`` remembers, and how much of each user message.
RECENT_REQUESTS = 4096
RECENT_CHARS = 2000
#: Marks of a policy's thinking: a RESPONSE section holding one was shown thinking.
THINKING_MARKERS = ("<think>", "</think>", "<thinking>", "<reasoning>")
#: Chat end-of-turn tokens (ChatML, Llama 3, Llama 2/Mistral, GPT-2/Qwen base).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>")


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
        #: the latest requests: model, first line of the user message ("title"), the
        #: message, and the body's top-level parameter names ("params")
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)
        self.params_seen: Counter[str] = Counter()
        self.requests_with_thinking = 0
        self.requests_with_end_of_turn = 0
        self.max_response_chars = 0
        self.reasoning_tokens_total = 0
        self.finish_reasons: Counter[str] = Counter()

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

    def record(self, model: str, user_message: str, params: Iterable[str] = ()) -> None:
        """Remember a request: which model it asked for, which instructions it sent
        (tests read them back to see which rubric each item was judged by) and which
        top-level body parameters it carried (counted in ``params_seen``)."""
        names = sorted(params)
        self.params_seen.update(names)
        self.recent.append({"model": model, "title": user_message.partition("\n")[0][:200],
                            "user": user_message[:RECENT_CHARS], "params": names})

    def shown(self, responses: Iterable[str]) -> None:
        """Count what a request showed the judge in its RESPONSE section(s): thinking
        marks, end-of-turn tokens, and the longest section's length."""
        thinking = end_of_turn = False
        for response in responses:
            if len(response) > self.max_response_chars:
                self.max_response_chars = len(response)
            if "<" not in response:  # every marker starts with "<": one scan for most
                continue
            thinking = thinking or any(mark in response for mark in THINKING_MARKERS)
            end_of_turn = end_of_turn or any(mark in response for mark in END_OF_TURN_MARKERS)
        self.requests_with_thinking += thinking
        self.requests_with_end_of_turn += end_of_turn

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
               *, scored: bool, reasoning_tokens: int = 0, finish_reason: str = "stop") -> None:
        """Count a 200 answer delivered; ``scored`` is false for a malformed or cut reply
        (one that carries no whole verdict)."""
        self.prompt_tokens_total += prompt_tokens
        self.completion_tokens_total += completion_tokens
        self.reasoning_tokens_total += reasoning_tokens
        self.finish_reasons[finish_reason] += 1
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
          prompt (a ``malformed`` reply, or one cut by the token budget, judges nothing):
          1 proves nothing was judged twice;
        - ``max_requests_in_any_1s``: most arrivals within any sliding 1 s window;
        - ``in_flight`` / ``max_in_flight``: requests being handled now / at the peak;
        - ``prompt_tokens_total`` / ``completion_tokens_total``: usage of delivered 200s;
          ``reasoning_tokens_total``: the reasoning tokens inside ``completion_tokens_total``;
        - ``finish_reasons``: ``"stop"`` / ``"length"`` (cut by the token budget) -> count
          of delivered 200s;
        - ``params_seen``: top-level request-body parameter -> how many requests carried
          it (every parsed request, refused ones included);
        - ``requests_with_thinking``: requests whose RESPONSE section(s) held ``<think>``,
          ``</think>``, ``<thinking>`` or ``<reasoning>``;
          ``requests_with_end_of_turn``: ... held ``<|im_end|>``, ``<|eot_id|>``, ``</s>``
          or ``<|endoftext|>``; ``max_response_chars``: the longest RESPONSE section;
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
            "reasoning_tokens_total": self.reasoning_tokens_total,
            "finish_reasons": dict(self.finish_reasons),
            "params_seen": dict(self.params_seen),
            "requests_with_thinking": self.requests_with_thinking,
            "requests_with_end_of_turn": self.requests_with_end_of_turn,
            "max_response_chars": self.max_response_chars,
            "faults_injected": dict(self.faults_injected),
            "rpm_rejections": self.rpm_rejections,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "process_cpu_s": round(time.process_time(), 4),
        }


def max_in_window(stamps: Iterable[float], window: float) -> int:
    """Most of ``stamps`` inside any closed window of length ``window`` (same unit): the
    busiest stretch a rate limit held, computed after the fact from send or arrival times."""
    ordered, best, lo = sorted(stamps), 0, 0
    for hi, stamp in enumerate(ordered):
        while stamp - ordered[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
