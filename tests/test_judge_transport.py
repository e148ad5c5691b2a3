"""The workers' judge transports answer alike: ``direct`` (one aiohttp session, no SDK)
against the openai SDK on its aiohttp and httpx transports.

Every transport is driven through ``JudgeClient`` (the one path every judge call takes)
against the real local judge over HTTP, in a thread of this process, with its faults
configured: 429 with ``Retry-After``, 500, 400, a stall past the client's timeout, and
a port nobody listens on. Each fault must give the same error class, kind, status and
``retry_after_s`` on every transport (and the same message where the judge answered),
the same verdicts when it does not fail, the same request on the wire, and a failover
between endpoints that works the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scoring_data import expected, make_items

from rewardq.broker.embedded import free_port
from rewardq.broker.errors import (
    JudgeError,
    JudgeErrorKind,
    PermanentJudgeError,
    TransientJudgeError,
)
from rewardq.broker.schemas import JudgeVerdict, ScoreItem
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import judge_spec
from rewardq.judge.rubrics import builtin_rubrics
from rewardq.judge_server.config import JudgeConfig
from rewardq.judge_server.server import BackgroundJudgeServer
from rewardq.monitoring.metrics import WorkerMetrics
from rewardq.workers.judge_client import DirectTransport, JudgeClient, SdkTransport, TimedReply

TRANSPORTS = ["direct", "aiohttp", "httpx"]
KEY = "sk-transport-test-0123456789abcdef"


class RecordingJudge(BackgroundJudgeServer):
    """The local judge, keeping each chat request's headers and body as received."""

    def __init__(self) -> None:
        super().__init__(JudgeConfig())
        self.seen: list[tuple[dict[str, str], bytes]] = []

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path.endswith("/chat/completions"):
                self.seen.append((dict(request.headers), await request.read()))
            response: web.StreamResponse = await handler(request)
            return response

        self.app.middlewares.append(record)

    def configure(self, **knobs: Any) -> None:
        """``POST /admin/config``."""
        admin = self.base_url.removesuffix("/v1") + "/admin/config"
        httpx.post(admin, json=knobs).raise_for_status()


@pytest.fixture(scope="module")
def server() -> Iterator[RecordingJudge]:
    with RecordingJudge() as judge:
        yield judge


@pytest.fixture
def judge(server: RecordingJudge) -> RecordingJudge:
    """The module's judge, healthy, with nothing recorded."""
    server.configure(error_rate=0.0, error_kinds=["429", "500"], seed=0, latency_ms=0,
                     retry_after_s=0.2, timeout_sleep_s=30.0)
    server.seen.clear()
    return server


def settings_for(transport: str, base_urls: list[str], **overrides: Any) -> Settings:
    # The key by its environment name: the field reads nothing else.
    values: dict[str, Any] = {"OPENAI_API_KEY": KEY, "judge_timeout_s": 10, **overrides}
    settings = Settings(judge_base_urls=base_urls, judge_transport=transport, **values)
    assert settings.judge_api_key.get_secret_value() == KEY
    return settings


def body(i: int = 1) -> dict[str, Any]:
    return {"model": "rewardq-local-judge", "max_tokens": 32, "temperature": 0.0,
            "messages": [{"role": "user", "content": f"What is {i} + 1? The answer is "
                                                     f"{i + 1}. Ünïcode ✓"}]}


def complete(settings: Settings, n: int = 1,
             metrics: WorkerMetrics | None = None) -> list[TimedReply | JudgeError]:
    """``n`` sequential ``JudgeClient.complete`` calls of a fresh client: each reply or
    the ``JudgeError`` it raised."""
    async def run() -> list[TimedReply | JudgeError]:
        client = JudgeClient(settings, metrics=metrics)
        out: list[TimedReply | JudgeError] = []
        try:
            for i in range(n):
                try:
                    out.append(await client.complete("rewardq-local-judge", body(i), 32))
                except JudgeError as exc:
                    out.append(exc)
        finally:
            await client.close()
        return out

    return asyncio.run(run())


def failure(settings: Settings) -> JudgeError:
    (error,) = complete(settings)
    assert isinstance(error, JudgeError), error
    return error


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


# -- the factory ---------------------------------------------------------------------

def test_the_setting_picks_the_transport(judge: RecordingJudge) -> None:
    for name, kind in (("direct", DirectTransport), ("aiohttp", SdkTransport),
                       ("httpx", SdkTransport)):
        client = JudgeClient(settings_for(name, [judge.base_url]))
        assert [type(t._inner) for t in client._transports] == [kind]


# -- the same errors for the same faults ---------------------------------------------

#: fault knobs -> (error class, kind, status, retry_after_s)
FAULTS: dict[str, tuple[dict[str, Any], type[JudgeError], JudgeErrorKind, int | None,
                        float | None]] = {
    "429": ({"error_kinds": ["429"], "retry_after_s": 0.35},
            TransientJudgeError, JudgeErrorKind.HTTP, 429, 0.35),
    "500": ({"error_kinds": ["500"]}, TransientJudgeError, JudgeErrorKind.HTTP, 500, None),
    "400": ({"error_kinds": ["400"]}, PermanentJudgeError, JudgeErrorKind.HTTP, 400, None),
    "401": ({"error_kinds": ["401"]}, PermanentJudgeError, JudgeErrorKind.HTTP, 401, None),
    "timeout": ({"error_kinds": ["timeout"], "timeout_sleep_s": 3.0},
                TransientJudgeError, JudgeErrorKind.TIMEOUT, None, None),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_gives_the_same_error_on_every_transport(judge: RecordingJudge, fault: str,
                                                         transport: str) -> None:
    knobs, cls, kind, status, retry_after = FAULTS[fault]
    judge.configure(error_rate=1.0, **knobs)
    metrics = WorkerMetrics()
    timeout_s = 0.5 if fault == "timeout" else 10.0

    (error,) = complete(settings_for(transport, [judge.base_url], judge_timeout_s=timeout_s),
                        metrics=metrics)

    assert type(error) is cls, error
    assert (error.kind, error.status_code, error.retry_after_s) == (kind, status, retry_after)
    assert KEY not in str(error) and KEY not in repr(error.__cause__)
    # Counted once, under the label the metrics give this error.
    label = str(status) if status is not None else kind.value
    assert count(metrics, "rewardq_judge_requests_total", status=label) == 1


@pytest.mark.parametrize("fault", ["429", "500", "400", "401"])
def test_an_error_answer_reads_word_for_word_as_the_sdks(judge: RecordingJudge,
                                                         fault: str) -> None:
    judge.configure(error_rate=1.0, **FAULTS[fault][0])

    messages = {t: str(failure(settings_for(t, [judge.base_url]))) for t in TRANSPORTS}

    assert messages["direct"] == messages["aiohttp"] == messages["httpx"], messages
    assert messages["direct"].startswith(f"judge answered HTTP {fault}: Error code: {fault} - ")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_dead_port_is_a_transient_endpoint_failure(transport: str) -> None:
    error = failure(settings_for(transport, [dead_url()]))

    assert isinstance(error, TransientJudgeError) and error.status_code is None
    # The SDK's vendored aiohttp transport maps a refused connection to ConnectTimeout,
    # so it reads as a timeout there; direct and the SDK on httpx say what happened.
    # Either way the retry layer retries it and the breaker counts it.
    assert error.kind is (JudgeErrorKind.TIMEOUT if transport == "aiohttp"
                          else JudgeErrorKind.NETWORK), error


def test_a_retry_after_ms_header_wins_and_whole_seconds_are_read_too(
        judge: RecordingJudge) -> None:
    # The local judge sends both: Retry-After rounded up to 2 s, retry-after-ms 1,250.
    judge.configure(error_rate=1.0, error_kinds=["429"], retry_after_s=1.25)

    found = {t: failure(settings_for(t, [judge.base_url])).retry_after_s for t in TRANSPORTS}

    assert found == {t: 1.25 for t in TRANSPORTS}


# -- the same verdicts and the same request ------------------------------------------

def verdicts(transport: str, base_url: str, items: list[ScoreItem]) -> list[JudgeVerdict]:
    settings = settings_for(transport, [base_url])
    rubrics = builtin_rubrics()
    spec = judge_spec(settings, rubrics)

    async def run() -> list[JudgeVerdict]:
        client = JudgeClient(settings)
        try:
            return [await client.judge(spec, item.model_copy(
                update={"rubric": rubrics.select(item)})) for item in items]
        finally:
            await client.close()

    return asyncio.run(run())


def test_every_transport_reads_the_same_verdicts(judge: RecordingJudge) -> None:
    raw = make_items(12, "transport")
    items = [ScoreItem.model_validate(item) for item in raw]

    found = {t: verdicts(t, judge.base_url, items) for t in TRANSPORTS}

    assert found["direct"] == found["aiohttp"] == found["httpx"]
    assert [(v.score, v.raw_score) for v in found["direct"]] == [expected(i) for i in raw]
    assert all(v.usage.prompt_tokens > 0 for v in found["direct"])


def test_direct_sends_the_sdks_request(judge: RecordingJudge) -> None:
    for transport in ("direct", "aiohttp"):
        (reply,) = complete(settings_for(transport, [judge.base_url]))
        assert isinstance(reply, TimedReply) and reply.content

    (direct_headers, direct_body), (sdk_headers, sdk_body) = judge.seen
    assert direct_body == sdk_body  # the same bytes: compact UTF-8 JSON
    for name in ("Authorization", "Content-Type", "Accept"):
        assert direct_headers[name] == sdk_headers[name], name
    assert direct_headers["Authorization"] == f"Bearer {KEY}"
    assert direct_headers["Content-Type"] == "application/json"


# -- failover between endpoints ------------------------------------------------------

def count(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(
        generate_latest(metrics.registry).decode()) for s in family.samples
        if s.name == name and labels.items() <= s.labels.items())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_down_endpoint_fails_over_within_the_call(judge: RecordingJudge,
                                                    transport: str) -> None:
    with BackgroundJudgeServer(JudgeConfig(error_rate=1.0, error_kinds=("500",))) as sick:
        dead = dead_url()
        settings = settings_for(transport, [dead, sick.base_url, judge.base_url],
                                judge_breaker_failures=1, judge_breaker_cooldown_s=600)
        metrics = WorkerMetrics()

        replies = complete(settings, n=6, metrics=metrics)

    assert all(isinstance(r, TimedReply) for r in replies), replies
    assert len(judge.seen) == 6
    # Each down endpoint failed once, opened its breaker and handed its call on.
    for url in (dead, sick.base_url):
        assert count(metrics, "rewardq_judge_endpoint_requests_total", endpoint=url) == 1
        assert count(metrics, "rewardq_judge_endpoint_failovers_total", endpoint=url) == 1
        assert count(metrics, "rewardq_judge_endpoint_breaker_state", endpoint=url) == 1
    assert count(metrics, "rewardq_judge_endpoint_requests_total", endpoint=sick.base_url,
                 status="500") == 1
    assert count(metrics, "rewardq_judge_requests_total", status="500") == 1
