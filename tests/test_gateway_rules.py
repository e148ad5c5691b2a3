"""The gateway's pure rules: which failures are sent to the fleet again, the label rule,
and the token queues' order and bounds."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from rewardq.broker.schemas import ResultStatus, ScoreResult
from rewardq.gateway.errors import GatewayRequestError
from rewardq.gateway.limits import TokenQueues
from rewardq.gateway.remote_rm import LabelError, RewardMapping, reference_of
from rewardq.gateway.scoring import is_transient
from rewardq.judge.verdicts import http_error, network_error, status_detail, timeout_error
from rewardq.workers.endpoints import EndpointPool


def failed(error: str, status: ResultStatus = ResultStatus.FAILED) -> ScoreResult:
    return ScoreResult.failure("x", status, error)


def test_transient_failures_are_told_from_permanent_ones_by_the_errors_the_fleet_writes(
        ) -> None:
    # The error texts are the ones the workers put into a failed result (str of the
    # JudgeError), built by the same functions the workers call.
    for status in (408, 409, 429, 500, 502, 503, 504):
        error = http_error(status, {}, status_detail(status, b'{"error": {"message": "m"}}'))
        assert is_transient(failed(str(error))), status
        assert is_transient(failed(f"group judging: {error}")), status
    assert is_transient(failed(str(timeout_error("read timed out"))))
    assert is_transient(failed(str(network_error("connection refused"))))
    pool = EndpointPool(["http://127.0.0.1:9/v1"], failures=3, cooldown_s=5.0)
    assert is_transient(failed(str(pool.unavailable_error())))
    assert is_transient(failed("deadline passed before the judge answered",
                               ResultStatus.TIMEOUT))
    for status in (400, 401, 403, 404, 413, 422):
        assert not is_transient(failed(str(http_error(status, {}, f"Error code: {status}"))))
    for final in (ResultStatus.INVALID, ResultStatus.NO_ANSWER, ResultStatus.BUDGET_EXCEEDED):
        assert not is_transient(failed("judge answered HTTP 500: but not this status", final))
    assert not is_transient(failed("no score in judge reply: 'maybe'"))
    assert not is_transient(failed("internal error: KeyError: 'x'"))
    assert not is_transient(ScoreResult(id="x", status=ResultStatus.OK, score=1.0))


@pytest.mark.parametrize(("label", "reference"), [
    ("144", "144"), (144, "144"), (1.5, "1.5"), (-3, "-3"),
    ({"ground_truth": "144"}, "144"), ({"answer": 144, "ground_truth": "7"}, "7"),
    ({"label": ["x"]}, "x"), ({"reference": "r", "source": "s"}, "r"),
    (["144"], "144"), ([{"answer": "a"}], "a"), ("  spaced  ", "  spaced  "),
])
def test_the_label_rule_finds_the_reference(label: Any, reference: str) -> None:
    assert reference_of(label) == reference
    item = RewardMapping().item("i", "p", "r", label, where="labels[0]")
    assert item["reference"] == reference and "metadata" not in item


@pytest.mark.parametrize("label", [None, "", " \n", True, False, {}, {"question": "q"},
                                   [], ["a", "b"], {"answer": None}, [[[[["x"]]]]]])
def test_a_label_without_a_reference_is_refused_naming_it(label: Any) -> None:
    with pytest.raises(LabelError):
        reference_of(label)
    with pytest.raises(GatewayRequestError) as refused:
        RewardMapping().item("i", "p", "r", label, where="labels[3]")
    assert refused.value.status == 422
    assert refused.value.message.startswith("labels[3] = ")
    assert refused.value.extra["problems"][0]["field"] == "labels[3]"
    # The quality rubric only when asked for: the label is kept as metadata.
    quality = RewardMapping(label_as="metadata").item("i", "p", "r", label, where="label")
    assert "reference" not in quality


def test_rewards_map_no_answer_per_item_and_name_what_was_not_scored() -> None:
    ok = ScoreResult(id="a", status=ResultStatus.OK, score=0.75)
    empty = failed("the rollout is empty", ResultStatus.NO_ANSWER)
    refused = failed("judge answered HTTP 400: Error code: 400")
    outage = failed("not scored before the request's deadline; last: failed: judge "
                    "answered HTTP 503: Error code: 503", ResultStatus.TIMEOUT)
    assert RewardMapping().rewards([ok, empty]) == [0.75, 0.0]
    assert RewardMapping(no_answer_reward=-1.0).rewards([empty]) == [-1.0]
    with pytest.raises(GatewayRequestError) as permanent:
        RewardMapping().rewards([ok, refused, outage])
    assert permanent.value.status == 502
    assert [(n["index"], n["permanent"]) for n in permanent.value.extra["items"]] == [
        (1, True), (2, False)]
    with pytest.raises(GatewayRequestError) as transient:
        RewardMapping().rewards([ok, outage])
    assert transient.value.status == 504
    with pytest.raises(GatewayRequestError):
        RewardMapping(no_answer_reward=None).rewards([empty])
    assert RewardMapping(failed_reward=-2.0).rewards([ok, refused, outage]) == [0.75, -2.0, -2.0]


def test_a_token_queue_serves_in_order_within_bounds_and_refuses_past_them() -> None:
    async def scenario() -> tuple[list[str], GatewayRequestError, GatewayRequestError,
                                  dict[str, int]]:
        queues = TokenQueues(2, max_items=10, max_bytes=1000, retry_after_s=3)
        order: list[str] = []
        release = asyncio.Event()
        deadline = time.monotonic() + 30

        def expired() -> GatewayRequestError:
            return GatewayRequestError(504, "timeout", "expired")

        async def request(name: str, token: str = "a", items: int = 1) -> None:
            async with queues.admit(token, items=items, nbytes=10, deadline=deadline,
                                    on_expired=expired):
                order.append(name)
                await release.wait()

        held = [asyncio.ensure_future(request(f"r{n}")) for n in range(5)]
        await asyncio.sleep(0.01)
        seen = dict(queues.queued())
        other = asyncio.ensure_future(request("other", token="b"))  # its own slots
        await asyncio.sleep(0.01)
        with pytest.raises(GatewayRequestError) as too_many:
            await request("over", items=6)  # 5 held + 6 > 10
        with pytest.raises(GatewayRequestError) as late:
            async with queues.admit("a", items=1, nbytes=1, deadline=time.monotonic() + 0.05,
                                    on_expired=expired):
                pass
        release.set()
        await asyncio.gather(*held, other)
        assert queues.in_flight() == {} and queues.queued() == {}
        return order, too_many.value, late.value, seen

    order, too_many, late, queued = asyncio.run(scenario())
    assert order[:2] == ["r0", "r1"] and "other" in order[2:3]
    assert [n for n in order if n != "other"] == ["r0", "r1", "r2", "r3", "r4"]
    assert queued == {"a": 3}
    assert too_many.status == 429 and too_many.headers == {"Retry-After": "3"}
    assert late.status == 504
