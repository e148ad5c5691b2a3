"""Logprob scoring (G-Eval): the score is the expectation over the scale tokens' logprobs.

Against the real local judge over HTTP: the expectation each test computes itself from
the logprobs the judge returns is what the sync judge and the worker fleet report; an
endpoint without logprobs gives the written integer, flagged ``parsed_fallback``.

The reader (``rewardq.judge.logprob_scores``), against token streams built from a known score
distribution the way each kind of tokenizer writes numbers (whole numbers, digit by digit,
chunks of three digits, a leading space): the score is the distribution's expectation
wherever the stream proves it, and flagged ``logprobs_partial`` (or refused) where it
cannot, never silently wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scoring_data import expected, make_items

from rewardq.broker.keys import judge_fingerprint
from rewardq.broker.schemas import JudgeSpec, JudgeVerdict, ResultStatus, ScoreItem, Usage
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import judge_request, judge_spec, judge_verdict, read_reply
from rewardq.judge.logprob_scores import (
    NEGLIGIBLE_SHARE,
    PARTIAL_LIMIT,
    LogprobScore,
    TokenLogprob,
    logprob_score,
    score_distribution,
)
from rewardq.judge.rollout_view import view_items
from rewardq.judge.rubrics import builtin_rubrics
from rewardq.judge_server.config import JudgeConfig
from rewardq.judge_server.digit_logprobs import intended_expectation
from rewardq.judge_server.server import BackgroundJudgeServer
from rewardq.producer.client import RewardClient
from rewardq.producer.sync_judge import SyncJudge
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
    """The body a worker sends for ``item`` (built-in rubrics): the judge is shown the
    item's view."""
    book = builtin_rubrics()
    viewed = view_items(book.assign([item]), spec, book)[0]
    assert isinstance(viewed, ScoreItem)
    return judge_request(spec, book.rubric_for(spec, viewed), viewed)


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


@pytest.mark.parametrize(("profile", "how"), [("plain", "inward"), ("digit-logprobs", "inward"),
                                            ("digit-logprobs", "up"),
                                            ("digit-logprobs", "down")])
def test_the_local_judges_logprobs_read_back_as_the_score_it_means(
        background_judge: Callable[..., BackgroundJudgeServer], profile: str,
        how: str) -> None:
    # item 1 is a wrong answer, graded 1; a per-model offset lifts it to every other value
    item = ScoreItem.model_validate(make_items(2, "lp-scale")[1])
    assert expected(item.model_dump())[1] == 1.0
    server = background_judge(profile=profile, digit_confidence=0.7, digit_neighbour=how,
                              model_offsets={f"judge-{k}": k - 1 for k in range(1, 11)})
    spec = judge_spec(_logprob_settings(Settings()))
    for score in range(1, 11):
        body = {**_request(spec, item), "model": f"judge-{score}"}
        reply = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=10)
        chat = read_reply(reply.content)
        assert chat.tokens is not None and chat.content is not None
        assert json.loads(chat.content)["score"] == score
        got = logprob_score(chat.tokens, (1, 10))
        assert got is not None, score
        if profile == "plain":  # whole-number tokens, "10" among them: always resolved
            assert _is(got, _expectation_from_reply(reply.json()), "logprobs"), score
        elif (how, score) in {("up", 9), ("down", 2)}:
            # "1" offered beside the written digit: 1 or 10 cannot be told, and it says so
            assert _is(got, score, "logprobs_partial"), score
        else:
            meant = intended_expectation(score, 0.7, how)
            assert _is(got, meant, "logprobs"), (score, got, meant)


# -- the reader: token streams as each kind of tokenizer writes them -----------------------

#: How a tokenizer cuts a number: one token ("10"), digit by digit ("1", "0": Qwen, Mistral),
#: chunks of up to three digits ("100", "0" for 1000: Llama 3, OpenAI), or with a leading
#: space on the first token (" 10", " 1").
STYLES = ("whole", "digits", "chunks", "spaced-whole", "spaced-digits")
SCALES = ((1, 10), (0, 10), (1, 5), (0, 5), (1, 7), (1, 100), (0, 100), (95, 100), (1, 1000))
#: What follows the number in the reply's JSON.
END = ","


def number_tokens(value: int, style: str) -> list[str]:
    text = str(value)
    if style.endswith("digits"):
        tokens = list(text)
    elif style == "chunks":
        tokens = [text[i:i + 3] for i in range(0, len(text), 3)]
    else:
        tokens = [text]
    if style.startswith("spaced"):
        tokens[0] = " " + tokens[0]
    return tokens


def _fixed(words: Sequence[str]) -> list[TokenLogprob]:
    """Tokens the judge wrote with certainty."""
    return [TokenLogprob(w, 0.0, ((w, 0.0),)) for w in words]


def score_stream(distribution: dict[int, float], written: int, style: str, *,
                 junk: float = 0.0, draft: int | None = None) -> tuple[TokenLogprob, ...]:
    """The reply ``{"score": <written>, "reason": "ok"}`` of a judge meaning
    ``distribution``, tokenized in ``style``: each position of the number offers every
    token the judge could write there, with its probability given the tokens before it.

    ``junk``: probability of a word instead of a number at the score's first position.
    ``draft``: a thinking block with a draft ``{"score": <draft>}`` comes first.
    """
    cut = {v: number_tokens(v, style) for v in distribution}
    mine = cut[written]
    stream = []
    if draft is not None:
        stream += _fixed(["<think>", "Draft", ":", ' {"score":', *number_tokens(draft, style),
                          "}", " wait", "</think>", "\n\n"])
    stream += _fixed(['{"', "score", '":'] if style.startswith("spaced")
                     else ['{"', "score", '":', " "])
    for j in range(len(mine) + 1):
        live = {v: p for v, p in distribution.items() if cut[v][:j] == mine[:j]}
        total = math.fsum(live.values())
        offered: dict[str, float] = {}
        for v, p in live.items():
            token = cut[v][j] if j < len(cut[v]) else END
            offered[token] = offered.get(token, 0.0) + p / total
        if j == 0 and junk:
            offered["seven"] = junk
        token = mine[j] if j < len(mine) else END
        stream.append(TokenLogprob(token, math.log(offered[token]),
                                   tuple((t, math.log(q)) for t, q in offered.items())))
    stream += _fixed([' "reason"', ': "', 'ok"}'])
    return tuple(stream)


def provable(distribution: dict[int, float], written: int, style: str,
             scale: tuple[int, int]) -> set[int]:
    """The values of ``distribution`` a reader can tell apart in ``score_stream``: where a
    value's tokens part from the written ones, no other value of the scale starts with the
    same tokens (or the value ends there). A tokenizer that keeps digits together shows
    it only through a token of two or more digits in the final answer (a draft score in
    the thinking is not searched); without one, its stream is a digit tokenizer's."""
    if not any(len(t.strip()) > 1 for v in distribution for t in number_tokens(v, style)):
        style = "digits"
    cut = {v: number_tokens(v, style) for v in range(scale[0], scale[1] + 1)}
    mine, proved = cut[written], set()
    for value in distribution:
        tokens = cut[value]
        common = next((k for k, (a, b) in enumerate(zip(tokens, mine, strict=False)) if a != b),
                      min(len(tokens), len(mine)))
        if common == len(tokens) or [u for u in cut if cut[u][:common + 1]
                                     == tokens[:common + 1]] == [value]:
            proved.add(value)
    return proved


@st.composite
def judges(draw: st.DrawFn) -> tuple[dict[int, float], int, str, tuple[int, int]]:
    """A scale, a tokenizer style, a score distribution on the scale and the value written."""
    scale = draw(st.sampled_from(SCALES))
    styles = STYLES if scale[1] < 1000 else ("digits", "chunks", "spaced-digits")
    style = draw(st.sampled_from(styles))
    values = draw(st.lists(st.integers(*scale), min_size=1, max_size=6, unique=True))
    weights = draw(st.lists(st.one_of(st.floats(0.01, 1.0), st.just(1e-7)),
                            min_size=len(values), max_size=len(values)))
    total = math.fsum(weights)
    distribution = {v: w / total for v, w in zip(values, weights, strict=True)}
    return distribution, draw(st.sampled_from(values)), style, scale


def _mean(distribution: dict[int, float]) -> float:
    return math.fsum(k * p for k, p in distribution.items()) / math.fsum(distribution.values())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(judges(), st.sampled_from([0.0, 0.05]), st.booleans())
def test_the_score_is_what_the_stream_proves_and_flagged_where_it_proves_less(
        judge: tuple[dict[int, float], int, str, tuple[int, int]], junk: float,
        thinking: bool) -> None:
    distribution, written, style, scale = judge
    draft = (scale[1] if written != scale[1] else scale[0]) if thinking else None
    tokens = score_stream(distribution, written, style, junk=junk, draft=draft)
    proved = provable(distribution, written, style, scale)
    unresolved = math.fsum(p for v, p in distribution.items() if v not in proved)
    assume(all(abs(unresolved - limit) > 1e-9 for limit in (PARTIAL_LIMIT, NEGLIGIBLE_SHARE)))

    read = score_distribution(tokens, scale)
    assert read is not None
    assert read.unresolved == pytest.approx(unresolved, abs=1e-9)
    assert read.proved == pytest.approx({v: distribution[v] for v in sorted(proved)}, abs=1e-9)

    score = logprob_score(tokens, scale)
    if unresolved > PARTIAL_LIMIT:
        assert score is None
        return
    assert score is not None
    assert score.value == pytest.approx(_mean({v: distribution[v] for v in proved}), abs=1e-9)
    assert score.source == ("logprobs" if unresolved <= NEGLIGIBLE_SHARE else "logprobs_partial")
    # never silently wrong: off by at most the unresolved share of the scale's span
    meant, span = _mean(distribution), scale[1] - scale[0]
    assert abs(score.value - meant) <= unresolved * span + 1e-9
    if score.source == "logprobs":
        assert abs(score.value - meant) <= 0.05
        if unresolved == 0:
            assert score.value == pytest.approx(meant, abs=1e-9)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.integers(1, 10), st.floats(0.01, 1.0), min_size=1),
       st.sampled_from(["whole", "spaced-whole", "chunks"]), st.data())
def test_whole_number_tokens_give_the_exact_expectation(
        weights: dict[int, float], style: str, data: st.DataObject) -> None:
    distribution = {v: w / math.fsum(weights.values()) for v, w in weights.items()}
    distribution[10] = distribution.get(10, 0.0) + 0.01  # the "10" token shows the tokenizer
    written = data.draw(st.sampled_from(sorted(distribution)))
    score = logprob_score(score_stream(distribution, written, style), (1, 10))
    assert score is not None and score.source == "logprobs"
    assert score.value == pytest.approx(_mean(distribution), abs=1e-9)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.integers(1, 10), st.floats(0.01, 1.0), min_size=1),
       st.sampled_from(["digits", "spaced-digits"]), st.data())
def test_digit_tokens_are_exact_when_the_judge_wrote_the_1_and_flagged_when_not(
        weights: dict[int, float], style: str, data: st.DataObject) -> None:
    distribution = {v: w / math.fsum(weights.values()) for v, w in weights.items()}
    written = data.draw(st.sampled_from(sorted(distribution)))
    score = logprob_score(score_stream(distribution, written, style), (1, 10))
    ones = distribution.get(1, 0.0) + distribution.get(10, 0.0)  # both behind a "1"
    if written in (1, 10) or ones == 0:
        assert score is not None and score.source == "logprobs"
        assert score.value == pytest.approx(_mean(distribution), abs=1e-9)
    elif ones > PARTIAL_LIMIT:
        assert score is None
    else:
        assert score is not None and score.source == "logprobs_partial"
        rest = {v: p for v, p in distribution.items() if v not in (1, 10)}
        assert score.value == pytest.approx(_mean(rest), abs=1e-9)


def _is(score: LogprobScore | None, value: float, source: str) -> bool:
    return (score is not None and score.value == pytest.approx(value, abs=1e-9)
            and score.source == source)


def test_the_issue_examples_on_a_digit_tokenizer() -> None:
    # meaning 10 (p 0.8) or 9: "1", "0" is read through both digits, 9.8 and not 1.8
    assert _is(logprob_score(score_stream({10: 0.8, 9: 0.2}, 10, "digits"), (1, 10)),
               9.8, "logprobs")
    assert _is(logprob_score(score_stream({10: 0.8, 9: 0.2}, 10, "whole"), (1, 10)),
               9.8, "logprobs")
    # meaning 9 (p 0.7) or 10, writing "9": the "1" may be 1 or 10, so it is left out, said
    meant_9 = score_stream({9: 0.7, 10: 0.3}, 9, "digits")
    assert _is(logprob_score(meant_9, (1, 10)), 9.0, "logprobs_partial")
    read = score_distribution(meant_9, (1, 10))
    assert read is not None and read.proved == pytest.approx({9: 0.7})
    assert read.unresolved == pytest.approx(0.3)
    # the same judge writing "1", "0": the next digit splits the "1"
    assert _is(logprob_score(score_stream({9: 0.7, 10: 0.3}, 10, "digits"), (1, 10)),
               9.3, "logprobs")
    # most of the probability unresolved: no score (the caller falls back, flagged)
    assert logprob_score(score_stream({9: 0.4, 10: 0.6}, 9, "digits"), (1, 10)) is None
    # a negligible unresolved share is exact within it
    tiny = logprob_score(score_stream({9: 1 - 1e-6, 10: 1e-6}, 9, "digits"), (1, 10))
    assert tiny is not None and tiny.source == "logprobs"
    assert tiny.value == pytest.approx(9.0, abs=1e-5)


def test_a_digit_tokenizer_1_to_100_and_other_scales() -> None:
    # 100 written "1", "0", "0": each digit's alternatives split the one before
    assert _is(logprob_score(score_stream({100: 0.6, 10: 0.3, 1: 0.1}, 100, "digits"),
                             (1, 100)), 63.1, "logprobs")
    assert _is(logprob_score(score_stream({100: 0.6, 10: 0.3, 1: 0.1}, 100, "chunks"),
                             (1, 100)), 63.1, "logprobs")
    # "9" before "85" may be 9 or 90-99
    assert _is(logprob_score(score_stream({85: 0.7, 86: 0.2, 90: 0.1}, 85, "digits"),
                             (1, 100)), (85 * 0.7 + 86 * 0.2) / 0.9, "logprobs_partial")
    # a "1" on 95-100 can only begin 100
    assert _is(logprob_score(score_stream({99: 0.5, 100: 0.5}, 99, "digits"), (95, 100)),
               99.5, "logprobs")
    assert _is(logprob_score(score_stream({0: 0.2, 5: 0.8}, 5, "digits"), (0, 5)),
               4.0, "logprobs")
    assert _is(logprob_score(score_stream({1000: 0.5, 999: 0.5}, 1000, "chunks"), (1, 1000)),
               999.5, "logprobs")


def test_a_tokenizer_that_keeps_digits_together_reads_a_lone_1_as_1() -> None:
    # Llama 3 writes 10 as "10": a "1" beside it is the number 1
    stream = score_stream({1: 0.3, 10: 0.5, 9: 0.2}, 9, "whole")
    assert _is(logprob_score(stream, (1, 10)), 0.3 + 5 + 1.8, "logprobs")
    # the same stream from a digit tokenizer would need the split
    assert _is(logprob_score(score_stream({1: 0.3, 10: 0.5, 9: 0.2}, 9, "digits"), (1, 10)),
               9.0, "logprobs_partial") is False  # 0.8 unresolved: no score
    assert logprob_score(score_stream({1: 0.3, 10: 0.5, 9: 0.2}, 9, "digits"), (1, 10)) is None


def test_spellings_of_one_value_are_summed_and_other_numbers_before_the_key_ignored() -> None:
    alternatives = (("7", math.log(0.25)), (" 7", math.log(0.25)), ("3", math.log(0.5)),
                    ("11", math.log(0.4)), ("seven", math.log(0.3)))
    tokens = (*_fixed(['{"id"', ": 1", ', "score', '":', " "]),
              TokenLogprob("7", math.log(0.25), alternatives), *_fixed([", ", '"r": 2}']))
    read = score_distribution(tokens, (1, 10))
    assert read is not None and read.proved == pytest.approx({3: 0.5, 7: 0.5})
    assert _is(logprob_score(tokens, (1, 10)), 5.0, "logprobs")


def test_raw_token_spellings_of_a_space_and_unusable_logprobs() -> None:
    # servers returning raw pieces spell the space as GPT-2's "Ġ" or SentencePiece's "▁"
    for space in ("\u0120", "\u2581"):
        top = ((f"{space}7", math.log(0.5)), (f"{space}9", math.log(0.5)))
        tokens = (*_fixed(['{"', "score", '":']), TokenLogprob(f"{space}7", math.log(0.5), top))
        assert _is(logprob_score(tokens, (1, 10)), 8.0, "logprobs"), space
    top = (("7", math.log(0.5)), ("8", math.nan), ("9", math.inf), ("3", -math.inf),
           ("5", math.log(0.5)))
    tokens = (*_fixed(['{"score": ']), TokenLogprob("7", math.log(0.5), top))
    assert _is(logprob_score(tokens, (1, 10)), 6.0, "logprobs")


def test_a_bare_reply_is_read_at_its_first_number_on_the_scale() -> None:
    top = (("8", math.log(0.6)), ("9", math.log(0.4)))
    assert _is(logprob_score((TokenLogprob("8", math.log(0.6), top),), (1, 10)),
               8.4, "logprobs")
    tokens = (*_fixed(["Step", " 12", ": I give "]), TokenLogprob("8", math.log(0.6), top),
              *_fixed(["/", "10"]))
    assert _is(logprob_score(tokens, (1, 10)), 8.4, "logprobs")


@pytest.mark.parametrize("tag", ["think", "thinking", "reasoning", "THINK"])
def test_the_score_is_read_after_the_last_closing_thinking_tag(tag: str) -> None:
    top = (("7", math.log(0.5)), ("8", math.log(0.5)))
    thinking = _fixed([f"<{tag}>", 'draft {"score": ', "2", "}", f"</{tag}>"])
    answer = (*_fixed(['{"score": ']), TokenLogprob("7", math.log(0.5), top), *_fixed(["}"]))
    assert _is(logprob_score((*thinking, *answer), (1, 10)), 7.5, "logprobs")
    # the chat template opened the thinking in the prompt: only its closing tag is written
    assert _is(logprob_score((*thinking[1:], *answer), (1, 10)), 7.5, "logprobs")
    # thinking left open (cut at the token limit): no final answer, no score
    assert logprob_score(thinking[:-1], (1, 10)) is None
    assert logprob_score((*thinking, *_fixed([f"<{tag}>"]), *answer), (1, 10)) is None


def test_the_final_answer_read_from_the_content_locates_the_score() -> None:
    # the token texts carry the thinking without its tags (a reasoning channel, a server
    # that drops them): the final answer the content gave says where the verdict is
    top = (("7", math.log(0.5)), ("8", math.log(0.5)))
    draft = _fixed(["We need", ' {"score": ', "2", "}. Check.", "\n"])
    verdict = (*_fixed(['{"score": ']), TokenLogprob("7", math.log(0.5), top), *_fixed(["}"]))
    tokens = (*draft, *verdict, *_fixed(["<|im_end|>"]))
    assert _is(logprob_score(tokens, (1, 10), answer='{"score": 7}\n'), 7.5, "logprobs")
    # the same draft written word for word as the verdict: the last one is the verdict
    same = (*_fixed(['{"score": ', "7", "}"]), *verdict)
    assert _is(logprob_score(same, (1, 10), answer='{"score": 7}'), 7.5, "logprobs")
    # an answer the tokens do not hold: the thinking tags decide
    tagged = (*_fixed(["<think>", 'draft {"score": 2}', "</think>"]), *verdict)
    assert _is(logprob_score(tagged, (1, 10), answer="{'score': 7}"), 7.5, "logprobs")


def test_no_number_where_the_score_is_reads_as_none() -> None:
    for words in ([], ['{"score": null, "n": 7}'], ["I cannot grade this."],
                  ['{"score": ', "-", "3}"], ["The answer is 42."]):
        assert logprob_score(_fixed(words), (1, 10)) is None, words
    with pytest.raises(ValueError, match="scale"):
        logprob_score(_fixed(["7"]), (5, 5))
    with pytest.raises(ValueError, match="scale"):
        logprob_score(_fixed(["7"]), (-1, 5))


def test_positions_without_alternatives_count_their_own_token() -> None:
    bare = (TokenLogprob('{"score": ', 0.0), TokenLogprob("1", -0.2), TokenLogprob("0", -0.3),
            TokenLogprob("}", 0.0))
    assert _is(logprob_score(bare, (1, 10)), 10.0, "logprobs")
    # the token written counts even where the top_logprobs list leaves it out
    left_out = (TokenLogprob('{"score": ', 0.0),
                TokenLogprob("7", math.log(0.6), (("8", math.log(0.2)),)))
    assert _is(logprob_score(left_out, (1, 10)), 7.25, "logprobs")


# -- the judge reply's tokens --------------------------------------------------------------


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
    got = logprob_score(_tokens(alternatives, sampled=str(min(logprobs))), (1, 10))
    assert got is not None and got.value == pytest.approx(want, abs=1e-9)
    assert 1.0 <= got.value <= 10.0


def test_no_scale_token_or_no_logprobs_falls_back_to_the_integer() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    content = '{"score": 7, "reason": "ok"}'
    no_scale = _tokens([("seven", -0.1), ("12", -0.2)], sampled="seven")
    for tokens in (None, (), no_scale):
        verdict = judge_verdict(content, usage, tokens, mode="logprobs")
        assert (verdict.raw_score, verdict.score_source) == (7.0, "parsed_fallback")
    parsed = judge_verdict(content, usage, _tokens([("3", 0.0)]), mode="parsed")
    assert (parsed.raw_score, parsed.score_source) == (7.0, "parsed")
    read = judge_verdict(content, usage, _tokens([("3", math.log(0.5)), ("5", math.log(0.5))],
                                                 sampled="3"), mode="logprobs")
    assert (read.raw_score, read.score, read.score_source) == (4.0, 1 / 3, "logprobs")


def test_logprobs_not_in_the_openai_shape_read_as_none() -> None:
    base = '{"choices": [{"message": {"content": "7"}, "logprobs": %s}]}'
    for logprobs in ('null', '{"content": null}', '{"content": [{"token": 7}]}',
                     '{"content": [{"token": "7", "logprob": "x"}]}', '[]'):
        assert read_reply(base % logprobs).tokens is None, logprobs
    good = read_reply(base % '{"content": [{"token": "7", "logprob": -0.1, '
                             '"top_logprobs": [{"token": "7", "logprob": -0.1}, 5]}]}')
    assert good.tokens is not None
    assert [(t.token, t.logprob, t.top) for t in good.tokens] == [("7", -0.1, (("7", -0.1),))]
