"""Several base URLs for one judge: least-outstanding routing and a circuit breaker each.

Pure logic apart from the clock (injectable): :class:`EndpointPool` picks the endpoint
of a judge call and learns from how the call went; ``rewardq.workers.judge_client`` does the
HTTP and fails a call over to another endpoint. One pool per worker process, used
from its asyncio loop only (no locks: nothing here awaits).

Routing: the live endpoint with the fewest calls in flight from this process; ties go
round-robin, so a process with few calls in flight still spreads them evenly.

Each endpoint's :class:`CircuitBreaker`::

    closed --(``failures`` consecutive failures)--> open
    open   --(``cooldown_s`` later, the next call)--> half-open: that call is the probe
    half-open --(probe succeeds)--> closed
    half-open --(probe fails)--> open (for another cooldown)

Only a sign that the endpoint is down counts as a failure (:func:`is_endpoint_failure`:
no connection, a timeout, a 5xx); an endpoint that answers 4xx, 429 included, is up.
While a probe is out no other call goes to that endpoint. A breaker opening is logged
as a WARNING and its closing as INFO, never once per call (a failed probe, once per
cooldown, only at DEBUG).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from rewardq.broker.errors import JudgeError, JudgeErrorKind, TransientJudgeError
from rewardq.monitoring.metrics import WorkerMetrics

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class BreakerState(enum.IntEnum):
    """A circuit breaker's state; the value is its metrics gauge."""

    CLOSED = 0     #: calls go through
    OPEN = 1       #: the endpoint is skipped until the cooldown ends
    HALF_OPEN = 2  #: one probe call decides whether it closes again


class CircuitBreaker:
    """The state machine of one endpoint (see the module docstring).

    Args:
        failures: consecutive failures that open it (``Settings.judge_breaker_failures``).
        cooldown_s: how long it stays open before a probe
            (``Settings.judge_breaker_cooldown_s``).
        clock: monotonic seconds (tests pass their own).

    Raises:
        ValueError: ``failures`` < 1 or ``cooldown_s`` <= 0.
    """

    def __init__(self, failures: int, cooldown_s: float, clock: Clock = time.monotonic) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError(f"breaker needs failures >= 1 and cooldown_s > 0, got "
                             f"{failures} and {cooldown_s}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.probing = False

    def available(self) -> bool:
        """Whether a call may go to the endpoint now (no state change)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN:
            return not self.probing
        return self._clock() - self.opened_at >= self.cooldown_s

    def reopens_in_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self._clock())

    def start_call(self) -> BreakerState | None:
        """A call goes to the endpoint (check :meth:`available` first). An open breaker
        past its cooldown turns half-open and the call is its probe.

        Returns:
            The new state when it changed, else ``None``.
        """
        if self.state is BreakerState.CLOSED:
            return None
        self.probing = True
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
            return self.state
        return None

    def succeeded(self) -> BreakerState | None:
        """The endpoint answered. Returns the new state when it changed."""
        self.consecutive_failures = 0
        self.probing = False
        if self.state is BreakerState.CLOSED:
            return None
        self.state = BreakerState.CLOSED
        return self.state

    def failed(self) -> BreakerState | None:
        """The endpoint looked down. Returns the new state when it changed."""
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self.probing = False
            return self._open()
        if self.state is BreakerState.CLOSED and self.consecutive_failures >= self.failures:
            return self._open()
        # Already open: a call started before it opened failed too; the cooldown stands.
        return None

    def abandoned(self) -> None:
        """A call ended without telling (cancelled): a probe's slot is free again."""
        self.probing = False

    def _open(self) -> BreakerState:
        self.state = BreakerState.OPEN
        self.opened_at = self._clock()
        return self.state


def is_endpoint_failure(error: JudgeError) -> bool:
    """Whether ``error`` says the endpoint is down (so its breaker counts it and the call
    fails over): no connection, a timeout, or a 5xx answer."""
    if error.kind in (JudgeErrorKind.NETWORK, JudgeErrorKind.TIMEOUT):
        return True
    return error.status_code is not None and error.status_code >= 500


def endpoint_label(base_url: str) -> str:
    """``base_url`` without credentials, for logs and metric labels."""
    parts = urlsplit(base_url)
    if "@" not in parts.netloc:
        return base_url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


@dataclass(eq=False)
class Endpoint:
    """One base URL of the judge, its calls in flight (from this process) and breaker."""

    index: int
    base_url: str
    breaker: CircuitBreaker
    label: str = ""
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.label = self.label or endpoint_label(self.base_url)


class NoEndpointError(TransientJudgeError):
    """Every endpoint's breaker is open (or probing): the call was not made. Transient:
    the retry layer tries the item again, after ``retry_after_s`` when one is known."""

    default_kind = JudgeErrorKind.NETWORK


class EndpointPool:
    """Chooses an endpoint per judge call and tracks each one's health.

    Args:
        base_urls: the judge's endpoints (``Settings.judge_endpoints``), at least one.
        failures: consecutive failures that open a breaker.
        cooldown_s: how long an open breaker waits before its probe.
        metrics: where per-endpoint calls, calls in flight and breaker states go.
        clock: monotonic seconds (tests pass their own).

    Raises:
        ValueError: no endpoints, or a bad ``failures``/``cooldown_s``.
    """

    def __init__(self, base_urls: Sequence[str], *, failures: int, cooldown_s: float,
                 metrics: WorkerMetrics | None = None, clock: Clock = time.monotonic) -> None:
        if not base_urls:
            raise ValueError("an endpoint pool needs at least one base URL")
        self.endpoints = [Endpoint(i, url, CircuitBreaker(failures, cooldown_s, clock))
                          for i, url in enumerate(base_urls)]
        self._metrics = metrics
        self._turn = 0
        if metrics is not None:
            for e in self.endpoints:
                metrics.endpoint_breaker(e.label, int(e.breaker.state))
                metrics.endpoint_in_flight(e.label, 0)

    def acquire(self, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        """The endpoint for the next call, counted in flight until :meth:`release`.

        Args:
            exclude: endpoints this call already tried (a failover goes elsewhere).

        Returns:
            The available endpoint with the fewest calls in flight (ties round-robin),
            or ``None`` when none is available.
        """
        least: list[Endpoint] = []
        for e in self.endpoints:
            if e in exclude or not e.breaker.available():
                continue
            if not least or e.in_flight < least[0].in_flight:
                least = [e]
            elif e.in_flight == least[0].in_flight:
                least.append(e)
        if not least:
            return None
        # Ties rotate over the candidates themselves: rotating over all endpoints would
        # hand an open one's turn to its neighbour and skew the spread.
        best = least[self._turn % len(least)]
        self._turn += 1
        before = best.breaker.state
        self._changed(best, before, best.breaker.start_call())
        best.in_flight += 1
        if self._metrics is not None:
            self._metrics.endpoint_in_flight(best.label, best.in_flight)
        return best

    def release(self, endpoint: Endpoint, status: str, *, failure: bool | None) -> None:
        """A call to ``endpoint`` ended.

        Args:
            endpoint: what :meth:`acquire` returned.
            status: the per-endpoint metric label (``ok``, ``500``, ``network``...).
            failure: whether the endpoint looked down (:func:`is_endpoint_failure`);
                ``None`` when the call ended without an answer either way (cancelled).
        """
        endpoint.in_flight -= 1
        breaker = endpoint.breaker
        if failure is None:
            breaker.abandoned()
        else:
            before = breaker.state
            self._changed(endpoint, before, breaker.failed() if failure else breaker.succeeded())
        if self._metrics is not None:
            self._metrics.endpoint_call(endpoint.label, status)
            self._metrics.endpoint_in_flight(endpoint.label, endpoint.in_flight)

    def unavailable_error(self) -> NoEndpointError:
        """The error of a call that found no endpoint, with the wait until a probe."""
        wait = min(e.breaker.reopens_in_s() for e in self.endpoints)
        return NoEndpointError(
            f"no judge endpoint available: all {len(self.endpoints)} circuit breakers are "
            f"open or probing (next probe in {wait:.1f}s)",
            retry_after_s=wait or None)

    def _changed(self, endpoint: Endpoint, before: BreakerState,
                 state: BreakerState | None) -> None:
        if state is None:
            return
        breaker = endpoint.breaker
        if state is BreakerState.OPEN and before is BreakerState.HALF_OPEN:
            # Once per cooldown while it stays down: the WARNING said so already.
            log.debug("judge endpoint %s still out: its probe failed", endpoint.label)
        elif state is BreakerState.OPEN:
            log.warning("judge endpoint %s is out: circuit breaker open after %d consecutive "
                        "failures; next probe in %.1fs", endpoint.label,
                        breaker.consecutive_failures, breaker.cooldown_s)
        elif state is BreakerState.CLOSED:
            log.info("judge endpoint %s is back: circuit breaker closed", endpoint.label)
        if self._metrics is not None:
            self._metrics.endpoint_breaker(endpoint.label, int(state))
