"""Cost accounting: the price table, the counting rule, and a run against a faulty judge."""

from __future__ import annotations

import time

import pytest
from scoring_data import make_items

from rewardq.broker.app import TASK_SCORE_CHUNK
from rewardq.broker.errors import ConfigError
from rewardq.broker.schemas import (
    ResultStatus,
    ScoreChunk,
    ScoreItem,
    ScoreResult,
    Usage,
    parse_items,
)
from rewardq.broker.settings import Settings
from rewardq.judge.rollout_view import view_items
from rewardq.monitoring.costs import CostLedger, Price, PriceTable, totals_of
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess

MODEL = "rewardq-local-judge"
PRICES = {MODEL: (3.0, 15.0), "*": (1.0, 2.0)}


def test_price_is_dollars_per_million_input_and_output_tokens() -> None:
    assert Price(3.0, 15.0).cost(1_000_000, 0) == 3.0
    assert Price(3.0, 15.0).cost(2_000, 100) == pytest.approx(0.006 + 0.0015)


def test_price_table_parses_json_falls_back_to_star_and_prices_unknown_models_at_zero() -> None:
    table = PriceTable.from_json('{"gpt-4o-mini": [0.15, 0.6], "*": [1, 2]}')
    assert table["gpt-4o-mini"] == Price(0.15, 0.6)
    assert table.cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert table.cost("some-other-model", 1_000_000, 0) == 1.0
    assert PriceTable({"a": (1, 1)}).cost("unlisted", 10**6, 10**6) == 0.0
    assert PriceTable.from_settings(Settings()).cost(MODEL, 10**6, 10**6) == 0.0


@pytest.mark.parametrize("text", ['["a", 1]', '{"a": [1]}', '{"a": "cheap"}', '{"a": [-1, 2]}',
                                  "{not json"])
def test_a_malformed_price_table_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        PriceTable.from_json(text)


def test_a_result_costs_once_only_when_ok_and_not_cached() -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=10)
    results = [
        ScoreResult(id="judged", status=ResultStatus.OK, score=1.0, attempts=3, usage=usage),
        ScoreResult(id="hit", status=ResultStatus.OK, score=1.0, cached=True, usage=usage),
        ScoreResult(id="failed", status=ResultStatus.FAILED, attempts=5, error="HTTP 500"),
        ScoreResult(id="late", status=ResultStatus.TIMEOUT, error="deadline"),
    ]
    totals = totals_of(results, MODEL, PriceTable(PRICES))
    assert (totals.items, totals.judged, totals.cached, totals.failed) == (4, 1, 1, 2)
    assert (totals.attempts, totals.retries) == (8, 6)
    assert (totals.prompt_tokens, totals.completion_tokens) == (1000, 10)
    assert totals.cost_usd == pytest.approx((1000 * 3.0 + 10 * 15.0) / 1e6)


def test_run_costs_equal_the_judges_billed_usage_times_the_prices_despite_retries(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    judge.configure(error_rate=0.3, error_kinds=["429", "500"])
    workers(2, judge_max_attempts=12)  # 0.3**12: no item runs out of attempts
    ledger = CostLedger(PRICES, settings.judge_model)
    items = make_items(120, "cost")
    with RewardClient(settings) as client:
        first = ledger.record(client.score(items[:60], step=1, timeout=120), step=1)
        # Step 2 repeats ten pairs of step 1 under new ids: cache hits cost nothing.
        again = [dict(item, id=f"{item['id']}-again") for item in items[:10]]
        second = ledger.record(client.score(items[60:] + again, step=2, timeout=120), step=2)

        # A chunk delivered again after it was scored (a redelivery: the message the
        # producer built, its items as the judge sees them) is all cache hits.
        stats_before = judge.stats()
        viewed = view_items(client.rubrics.assign(parse_items(items[60:76])), client.spec,
                            client.rubrics)
        chunk = ScoreChunk(job_id="redelivered", chunk_index=0, step=2, spec=client.spec,
                           items=[v for v in viewed if isinstance(v, ScoreItem)],
                           deadline=time.time() + 60)
        raw = client.app.send_task(TASK_SCORE_CHUNK, args=[chunk.model_dump(mode="json")],
                                   task_id="redelivered-0").get(timeout=60)
        redelivered = ledger.record([ScoreResult.model_validate(r) for r in raw["results"]],
                                    step=2)
    stats = judge.stats()

    assert stats["requests_total"] == stats_before["requests_total"]
    assert (redelivered.judged, redelivered.cached, redelivered.cost_usd) == (0, 16, 0.0)
    assert ledger.steps[2].cached == second.cached + 16
    assert stats["responses_by_status"].get("429", 0) + \
        stats["responses_by_status"].get("500", 0) > 0  # retries really happened
    total = ledger.total
    assert total.retries > 0
    # Every judge request was made for some item and is reported as one of its attempts.
    assert total.attempts == stats["requests_total"]
    assert total.judged == stats["responses_by_status"]["200"]
    assert total.prompt_tokens == stats["prompt_tokens_total"]
    assert total.completion_tokens == stats["completion_tokens_total"]
    assert total.cost_usd == pytest.approx(
        (stats["prompt_tokens_total"] * 3.0 + stats["completion_tokens_total"] * 15.0) / 1e6)
    assert first.cost_usd + second.cost_usd == pytest.approx(total.cost_usd)
    assert (first.cached, second.cached) == (0, 10)
    assert (total.judged, total.failed) == (120, 0)  # each distinct pair paid once
