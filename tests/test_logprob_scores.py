"""Logprob scoring (G-Eval): the score is the expectation over the scale tokens' logprobs.

Against the real local judge over HTTP: the expectation each test computes itself from
the logprobs the judge returns is what the sync judge and the worker fleet report; an
endpoint without logprobs gives the written integer, flagged ``parsed_fallback``.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scoring_data import expected, make_items

from broker.judge_core import (
    TokenLogprob,
    expected_score,
    judge_request,
    judge_spec,
    judge_verdict,
    read_reply,
    scale_distribution,
)
from broker.keys import judge_fingerprint
from broker.rubrics import builtin_rubrics
from broker.schemas import JudgeSpec, JudgeVerdict, ResultStatus, ScoreItem, Usage
from broker.settings import Settings
from judge_server.config import JudgeConfig
from judge_server.server import BackgroundJudgeServer
from producer.client import RewardClient
from producer.sync_judge import SyncJudge
from rewardq.stack import JudgeProcess


def _expectation_from_reply(reply: dict[str, Any]) -> float:
    """E[k] over "1".."10" at the token after ``"score": ``, from the raw reply JSON."""
    text = ""
    for entry in reply["choices"][0]["logprobs"]["content"]:
        if text.endswith('"score": '):
            probs = {int(alt["token"]): math.exp(alt["logprob"])
                     for alt in entry["top_logprobs"] if alt["token"] in map(str, range(1, 11))}
            return sum(k * p for k, p in probs.items()) / sum(probs.values())
        text += entry["token"]
    raise AssertionError(f"no score token in {text!r}")


def _logprob_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"judge_score_mode": "logprobs"})


# -- the sync judge and the fleet against the local judge ------------------------------------


def _request(spec: JudgeSpec, item: ScoreItem) -> dict[str, Any]:
    """The body a worker sends for ``item`` (built-in rubrics)."""
    return judge_request(spec, builtin_rubrics().rubric_for(spec, item), item)


def test_sync_judge_scores_the_expectation_of_the_judges_logprobs(
        settings: Settings, judge: JudgeProcess) -> None:
    logprob_settings = _logprob_settings(settings)
    spec = judge_spec(logprob_settings)
    items = make_items(30, "lp-sync")
    with SyncJudge(logprob_settings) as sync_judge:
        results = sync_judge.score(items)

    differing = 0
    for item, result in zip(items, results, strict=True):
        body = _request(spec, ScoreItem.model_validate(item))
        assert body["logprobs"] is True and body["top_logprobs"] == 20
        reply = httpx.post(f"{judge.base_url}/chat/completions", json=body, timeout=10).json()
        want = _expectation_from_reply(reply)
        assert result.status is ResultStatus.OK and result.score_source == "logprobs"
        assert result.raw_score == pytest.approx(want, abs=1e-6), item["id"]
        assert result.score == pytest.approx((want - 1) / 9, abs=1e-6), item["id"]
        differing += abs(result.raw_score - expected(item)[1]) > 1e-3
    assert differing >= len(items) // 2  # a continuous score, not the integer again


def test_the_fleet_scores_what_the_sync_judge_scores(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    logprob_settings = _logprob_settings(settings)
    items = make_items(60, "lp-fleet")
    with SyncJudge(logprob_settings) as sync_judge:
        want = sync_judge.score(items)
    workers(2)
    with RewardClient(logprob_settings) as client:
        results = client.submit(items, step=1).result(timeout=120)

    assert [r.id for r in results] == [i["id"] for i in items]
    for got, ref in zip(results, want, strict=True):
        assert got.status is ResultStatus.OK and got.score_source == "logprobs", got
        assert got.raw_score == pytest.approx(ref.raw_score, abs=1e-6), got.id
        assert got.score == pytest.approx(ref.score, abs=1e-6), got.id


def test_an_endpoint_without_logprobs_gives_the_integer_and_the_flag(
        settings: Settings) -> None:
    items = make_items(12, "lp-none")
    with (BackgroundJudgeServer(JudgeConfig(logprobs=False)) as server,
          SyncJudge(_logprob_settings(settings), base_url=server.base_url) as sync_judge):
        body = _request(judge_spec(_logprob_settings(settings)),
                        ScoreItem.model_validate(items[0]))
        reply = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=10).json()
        results = sync_judge.score(items)

    assert reply["choices"][0]["logprobs"] is None
    for item, result in zip(items, results, strict=True):
        assert result.status is ResultStatus.OK and result.score_source == "parsed_fallback"
        assert (result.score, result.raw_score) == expected(item), item["id"]


def test_parsed_mode_asks_for_no_logprobs_and_keeps_its_cache_keys(settings: Settings) -> None:
    item = ScoreItem.model_validate(make_items(1, "lp-key")[0])
    parsed, logprobs = judge_spec(settings), judge_spec(_logprob_settings(settings))
    assert "logprobs" not in _request(parsed, item)
    assert judge_fingerprint(parsed, item) != judge_fingerprint(logprobs, item)
    # a verdict cached before score_source existed still reads, as a parsed one
    old = JudgeVerdict.model_validate_json('{"score": 0.5, "raw_score": 5.5, "usage": '
                                           '{"prompt_tokens": 1, "completion_tokens": 2}}')
    assert old.score_source == "parsed"


# -- the pure reader -----------------------------------------------------------------------


def _tokens(score_alternatives: list[tuple[str, float]], prefix: str = '{"score": ',
            sampled: str = "7") -> tuple[TokenLogprob, ...]:
    words = [prefix[i:i + 3] for i in range(0, len(prefix), 3)]
    return (*(TokenLogprob(w, 0.0, ((w, 0.0),)) for w in words),
            TokenLogprob(sampled, -0.1, tuple(score_alternatives)),
            TokenLogprob(', "reason": "ok"}', 0.0))


@given(st.dictionaries(st.integers(1, 10), st.floats(-30.0, 0.0), min_size=1))
def test_the_expectation_renormalizes_over_the_scale_tokens_present(
        logprobs: dict[int, float]) -> None:
    alternatives = [(str(k), lp) for k, lp in logprobs.items()] + [("seven", -0.01)]
    weights = {k: math.exp(lp) for k, lp in logprobs.items()}
    want = sum(k * w for k, w in weights.items()) / sum(weights.values())
    got = expected_score(_tokens(alternatives))
    assert got is not None and got == pytest.approx(want, abs=1e-9)
    assert 1.0 <= got <= 10.0


def test_spellings_of_one_value_are_summed_and_other_numbers_before_the_key_ignored() -> None:
    alternatives = [("7", math.log(0.25)), (" 7", math.log(0.25)), ("3", math.log(0.5)),
                    ("11", math.log(0.4))]
    # "1" in the prefix comes before "score": the score's position is the "7" after it
    tokens = _tokens(alternatives, prefix='{"id": 1, "score": ')
    assert scale_distribution(tokens) == pytest.approx({3: 0.5, 7: 0.5})
    assert expected_score(tokens) == pytest.approx(5.0)


def test_a_bare_number_reply_is_read_at_its_first_scale_token() -> None:
    tokens = (TokenLogprob("8", -0.5, (("8", math.log(0.6)), ("9", math.log(0.4)))),)
    assert expected_score(tokens) == pytest.approx(8.4)


def test_no_scale_token_or_no_logprobs_falls_back_to_the_integer() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    content = '{"score": 7, "reason": "ok"}'
    no_scale = _tokens([("seven", -0.1), ("12", -0.2)])
    for tokens in (None, (), no_scale):
        verdict = judge_verdict(content, usage, tokens, mode="logprobs")
        assert (verdict.raw_score, verdict.score_source) == (7.0, "parsed_fallback")
    parsed = judge_verdict(content, usage, _tokens([("3", 0.0)]), mode="parsed")
    assert (parsed.raw_score, parsed.score_source) == (7.0, "parsed")
    read = judge_verdict(content, usage, _tokens([("3", math.log(0.5)), ("5", math.log(0.5))]),
                         mode="logprobs")
    assert (read.raw_score, read.score, read.score_source) == (4.0, 1 / 3, "logprobs")


def test_logprobs_not_in_the_openai_shape_read_as_none() -> None:
    base = '{"choices": [{"message": {"content": "7"}, "logprobs": %s}]}'
    for logprobs in ('null', '{"content": null}', '{"content": [{"token": 7}]}',
                     '{"content": [{"token": "7", "logprob": "x"}]}', '[]'):
        assert read_reply(base % logprobs).tokens is None, logprobs
    good = read_reply(base % '{"content": [{"token": "7", "logprob": -0.1, '
                             '"top_logprobs": [{"token": "7", "logprob": -0.1}, 5]}]}')
    assert good.tokens == (TokenLogprob("7", -0.1, (("7", -0.1),)),)
