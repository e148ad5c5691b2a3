"""The local judge's profiles: it answers the way today's judges do, over real HTTP.

Each profile is driven through the shared judge process (``judge_profile`` fixture) with
the real ``openai`` SDK, and with raw httpx where the SDK would hide the body: status
codes, error bodies, ``finish_reason``, usage and logprob shapes are what the providers
document (``rewardq.judge_server.profiles`` cites them).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from rewardq.judge_server.__main__ import add_arguments, config_from_args
from rewardq.judge_server.config import DEFAULT_REASONING_TOKENS, ConfigValueError, JudgeConfig
from rewardq.judge_server.digit_logprobs import (
    digit_tokens,
    intended_distribution,
    intended_expectation,
    neighbour,
)
from rewardq.judge_server.grading import CORRECT_SCORE, INCORRECT_SCORE, expected_raw_score
from rewardq.judge_server.protocol import count_tokens
from rewardq.judge_server.server import BackgroundJudgeServer
from rewardq.stack import JudgeProcess

MODEL = "rewardq-local-judge"
#: What the OpenAI 400 for ``max_tokens`` says, word for word.
MAX_TOKENS_MESSAGE = ("Unsupported parameter: 'max_tokens' is not supported with this model. "
                      "Use 'max_completion_tokens' instead.")
SCORE_SCHEMA: Any = {"type": "json_schema", "json_schema": {
    "name": "verdict", "strict": True,
    "schema": {"type": "object", "additionalProperties": False, "required": ["score"],
               "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}}}}}

JudgeProfile = Callable[..., JudgeProcess]


def item_message(prompt: str, response: str, reference: str | None = None) -> str:
    """A rewardq judge prompt in the wire format the judge reads back."""
    if reference is None:
        head = f"rewardq-judge v1 quality\n<<<PROMPT>>>\n{prompt}\n<<<END PROMPT>>>\n"
    else:
        head = (f"rewardq-judge v1 correctness\n<<<PROMPT>>>\n{prompt}\n<<<END PROMPT>>>\n"
                f"<<<REFERENCE>>>\n{reference}\n<<<END REFERENCE>>>\n")
    return f"{head}<<<RESPONSE>>>\n{response}\n<<<END RESPONSE>>>"


def messages(prompt: str, response: str, reference: str | None = None) -> list[Any]:
    return [{"role": "system", "content": "You are a strict grader."},
            {"role": "user", "content": item_message(prompt, response, reference)}]


RIGHT = ("What is 6 x 7?", "6 x 7 = 42, so the answer is 42.", "42")   # graded 10
WRONG = ("What is 6 x 7?", "It is \\boxed{48}", "42")                    # graded 1
QUALITY = ("Explain 2 + 2.", "Adding 2 and 2 gives 4.\nSo the answer is 4.", None)


def client(judge: JudgeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=judge.base_url, api_key="test-key", max_retries=0)


def post(judge: JudgeProcess, **body: Any) -> httpx.Response:
    return httpx.post(judge.base_url + "/chat/completions",
                      json={"model": MODEL, **body}, timeout=10)


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body: dict[str, Any] = exc.response.json()["error"]
    return body


def final_json(content: str) -> dict[str, Any]:
    """The verdict after the thinking block."""
    verdict: dict[str, Any] = json.loads(content.rsplit("</think>", 1)[1])
    return verdict


# ------------------------------------------------------------------------- plain


def test_plain_is_the_default_and_answers_as_before(judge: JudgeProcess) -> None:
    config = judge.configure()
    assert config["profile"] == "plain" and config["refuse_response_format"] is False
    reply = client(judge).chat.completions.create(
        model=MODEL, messages=messages(*RIGHT), temperature=0.0, max_tokens=64)
    content = reply.choices[0].message.content
    assert content is not None
    assert json.loads(content)["score"] == CORRECT_SCORE and "reason" in json.loads(content)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == count_tokens(content)
    assert reply.usage.completion_tokens_details is None
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None


@pytest.mark.parametrize("profile", ["plain", "openai-reasoning", "digit-logprobs",
                                     "reasoning-field"])
def test_every_profile_answers_a_json_schema_with_exactly_the_object(
        judge_profile: JudgeProfile, profile: str) -> None:
    judge = judge_profile(profile)
    for prompt, response, reference in (RIGHT, WRONG, QUALITY):
        reply = client(judge).chat.completions.create(
            model=MODEL, messages=messages(prompt, response, reference),
            response_format=SCORE_SCHEMA, max_completion_tokens=4096)
        assert reply.choices[0].message.content == json.dumps(
            {"score": expected_raw_score(prompt, response, reference)})


def test_think_in_content_answers_a_json_schema_after_its_thinking(
        judge_profile: JudgeProfile) -> None:
    judge = judge_profile("think-in-content", thinking_tokens=64)
    reply = post(judge, messages=messages(*WRONG), response_format=SCORE_SCHEMA,
                 max_tokens=4096).json()
    content = reply["choices"][0]["message"]["content"]
    assert content.startswith("<think>\n")
    assert content.endswith('\n</think>\n\n{"score": 1}')


# ------------------------------------------------------------------ openai-reasoning


def test_openai_reasoning_refuses_max_tokens_with_the_api_body(
        judge_profile: JudgeProfile) -> None:
    judge = judge_profile("openai-reasoning")
    with pytest.raises(openai.BadRequestError) as caught:
        client(judge).chat.completions.create(model="gpt-5-mini", messages=messages(*RIGHT),
                                              max_tokens=64, temperature=0.0)
    assert caught.value.status_code == 400
    assert error_of(caught.value) == {"message": MAX_TOKENS_MESSAGE,
                                      "type": "invalid_request_error",
                                      "param": "max_tokens", "code": "unsupported_parameter"}


@pytest.mark.parametrize(("extra", "param", "code", "message"), [
    ({"temperature": 0.0}, "temperature", "unsupported_value",
     "Unsupported value: 'temperature' does not support 0.0 with this model. "
     "Only the default (1) value is supported."),
    ({"temperature": 0}, "temperature", "unsupported_value",
     "Unsupported value: 'temperature' does not support 0 with this model. "
     "Only the default (1) value is supported."),
    ({"top_p": 0.5}, "top_p", "unsupported_value",
     "Unsupported value: 'top_p' does not support 0.5 with this model. "
     "Only the default (1) value is supported."),
    ({"logprobs": True, "top_logprobs": 5}, "logprobs", "unsupported_parameter",
     "Unsupported parameter: 'logprobs' is not supported with this model."),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter",
     "Unsupported parameter: 'presence_penalty' is not supported with this model."),
    ({"reasoning_effort": "max"}, "reasoning_effort", "unsupported_value",
     "Unsupported value: 'reasoning_effort' does not support 'max' with this model. "
     "Supported values are: 'minimal', 'low', 'medium', and 'high'."),
    ({"top_k": 20}, "top_k", "unknown_parameter", "Unknown parameter: 'top_k'."),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs",
     "unknown_parameter", "Unknown parameter: 'chat_template_kwargs'."),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "integer_below_min_value",
     "Invalid 'max_completion_tokens': integer below minimum value. "
     "Expected a value >= 1, but got 0 instead."),
])
def test_openai_reasoning_refuses_what_the_api_refuses(
        judge_profile: JudgeProfile, extra: dict[str, Any], param: str, code: str,
        message: str) -> None:
    judge = judge_profile("openai-reasoning")
    response = post(judge, messages=messages(*RIGHT), **extra)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": message, "type": "invalid_request_error",
                                         "param": param, "code": code}}
    assert judge.stats()["responses_by_status"] == {"400": 1}


def test_openai_reasoning_counts_reasoning_in_the_completion_budget(
        judge_profile: JudgeProfile) -> None:
    judge = judge_profile("openai-reasoning")
    sdk = client(judge)
    efforts: dict[Any, int] = dict(DEFAULT_REASONING_TOKENS)
    for effort, reasoning in efforts.items():
        reply = sdk.chat.completions.create(
            model="gpt-5-mini", messages=messages(*RIGHT), reasoning_effort=effort,
            max_completion_tokens=reasoning + 200, temperature=1)
        content = reply.choices[0].message.content
        assert content is not None and json.loads(content)["score"] == CORRECT_SCORE
        assert "<think>" not in content and reply.choices[0].finish_reason == "stop"
        usage = reply.usage
        assert usage is not None and usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens == reasoning
        assert usage.completion_tokens == reasoning + count_tokens(content)
    # No reasoning_effort: the documented default, medium.
    reply = sdk.chat.completions.create(model="gpt-5-mini", messages=messages(*WRONG),
                                        max_completion_tokens=4096)
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == efforts["medium"]
    # A budget that does not cover reasoning + verdict: empty, cut, all spent reasoning.
    reply = sdk.chat.completions.create(model="gpt-5-mini", messages=messages(*WRONG),
                                        max_completion_tokens=64)
    assert reply.choices[0].message.content == ""
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 64
    assert reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 64
    stats = judge.stats()
    assert stats["finish_reasons"] == {"stop": 5, "length": 1}
    assert stats["reasoning_tokens_total"] == sum(efforts.values()) + efforts["medium"] + 64
    assert stats["max_ok_per_prompt"] == 4  # RIGHT scored 4 times; the cut reply scores nothing


def test_openai_reasoning_tokens_are_settable(judge_profile: JudgeProfile) -> None:
    judge = judge_profile("openai-reasoning", reasoning_tokens={"minimal": 8})
    assert judge.configure()["reasoning_tokens"] == {**dict(DEFAULT_REASONING_TOKENS),
                                                     "minimal": 8}
    reply = post(judge, messages=messages(*RIGHT), reasoning_effort="minimal",
                 max_completion_tokens=4096).json()
    assert reply["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8
    needed = reply["usage"]["completion_tokens"]
    assert needed == 8 + count_tokens(reply["choices"][0]["message"]["content"])
    # Exactly enough fits; one token less is cut.
    reply = post(judge, messages=messages(*RIGHT), reasoning_effort="minimal",
                 max_completion_tokens=needed).json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    reply = post(judge, messages=messages(*RIGHT), reasoning_effort="minimal",
                 max_completion_tokens=needed - 1).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["message"]["content"] == ""


# ------------------------------------------------------------------ think-in-content


@pytest.mark.parametrize("case", [RIGHT, WRONG, QUALITY])
def test_think_in_content_writes_a_draft_that_differs_from_the_verdict(
        judge_profile: JudgeProfile, case: tuple[str, str, str | None]) -> None:
    judge = judge_profile("think-in-content")
    score = expected_raw_score(*case)
    reply = client(judge).chat.completions.create(model=MODEL, messages=messages(*case),
                                                  max_tokens=4096, temperature=0.0)
    content = reply.choices[0].message.content
    assert content is not None and reply.choices[0].finish_reason == "stop"
    assert content.startswith("<think>\n") and "\n</think>\n\n" in content
    thinking = content.split("\n</think>", 1)[0]
    draft = json.loads(thinking[thinking.index("{"):thinking.index("}") + 1])
    assert draft == {"score": 11 - score} and draft["score"] != score
    assert final_json(content)["score"] == score
    assert reply.usage is not None and reply.usage.completion_tokens == math.ceil(
        len(content) / 4)
    # The thinking is thinking_tokens (default 256) tokens of 4 characters.
    assert len(thinking) - len("<think>\n") == 256 * 4


def test_think_in_content_cuts_at_the_token_budget(judge_profile: JudgeProfile) -> None:
    judge = judge_profile("think-in-content")
    reply = post(judge, messages=messages(*RIGHT), max_tokens=64, temperature=0).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"]) == 64 * 4
    assert "</think>" not in choice["message"]["content"]
    assert '{"score": 1}' in choice["message"]["content"]  # the draft, the trap
    assert reply["usage"]["completion_tokens"] == 64
    # max_completion_tokens is honoured the same way (it wins over max_tokens).
    reply = post(judge, messages=messages(*RIGHT), max_tokens=4096,
                 max_completion_tokens=10).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 10
    assert judge.stats()["finish_reasons"] == {"length": 2}
    assert judge.stats()["max_ok_per_prompt"] == 0


def test_think_in_content_thinking_length_and_switch(judge_profile: JudgeProfile) -> None:
    judge = judge_profile("think-in-content", thinking_tokens=2000)
    reply = post(judge, messages=messages(*RIGHT), max_tokens=1000).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    reply = post(judge, messages=messages(*RIGHT), max_tokens=2100).json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert final_json(reply["choices"][0]["message"]["content"])["score"] == CORRECT_SCORE
    # Qwen3's switch: chat_template_kwargs enable_thinking false, no thinking at all.
    reply = client(judge).chat.completions.create(
        model=MODEL, messages=messages(*RIGHT), max_tokens=64,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    content = reply.choices[0].message.content
    assert content is not None and "<think>" not in content
    assert json.loads(content)["score"] == CORRECT_SCORE


@pytest.mark.parametrize("profile", ["think-in-content", "reasoning-field"])
def test_think_tag_in_prompt_leaves_only_the_closing_tag(judge_profile: JudgeProfile,
                                                         profile: str) -> None:
    judge = judge_profile(profile, thinking_tokens=32, think_tag_in_prompt=True)
    message = post(judge, messages=messages(*WRONG), max_tokens=4096).json()[
        "choices"][0]["message"]
    if profile == "think-in-content":
        assert message["content"].startswith("Let me grade")
        assert "<think>" not in message["content"]
        assert final_json(message["content"])["score"] == INCORRECT_SCORE
    else:
        assert message["reasoning_content"].startswith("Let me grade")
        assert json.loads(message["content"])["score"] == INCORRECT_SCORE


def test_think_in_content_group_prompts_draft_the_reverse(judge_profile: JudgeProfile) -> None:
    judge = judge_profile("think-in-content", thinking_tokens=64)
    group = ("rewardq-group v1 listwise\n<<<PROMPT>>>\nWhat is 6 x 7?\n<<<END PROMPT>>>\n"
             "<<<REFERENCE>>>\n42\n<<<END REFERENCE>>>\n"
             "<<<RESPONSE A>>>\nThe answer is 42.\n<<<END RESPONSE A>>>\n"
             "<<<RESPONSE B>>>\nThe answer is 41.\n<<<END RESPONSE B>>>")
    reply = post(judge, messages=[{"role": "user", "content": group}]).json()
    content = reply["choices"][0]["message"]["content"]
    assert final_json(content)["scores"] == {"A": 10, "B": 1}
    assert '{"scores": {"A": 1, "B": 10}}' in content.split("</think>")[0]


def test_one_server_plays_an_ensemble_of_different_judges(judge_profile: JudgeProfile) -> None:
    judge = judge_profile("plain", model_profiles={"judge-r1": "think-in-content",
                                                   "judge-gpt5": "openai-reasoning"})
    assert judge.configure()["model_profiles"] == {"judge-gpt5": "openai-reasoning",
                                                   "judge-r1": "think-in-content"}
    body = {"messages": messages(*RIGHT), "max_tokens": 4096, "temperature": 0}
    plain = post(judge, **body).json()["choices"][0]["message"]["content"]
    assert json.loads(plain)["score"] == CORRECT_SCORE
    thinking = post(judge, **{**body, "model": "judge-r1"}).json()
    assert final_json(thinking["choices"][0]["message"]["content"])["score"] == CORRECT_SCORE
    refused = post(judge, **{**body, "model": "judge-gpt5"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


# ------------------------------------------------------------------- reasoning-field


def test_reasoning_field_moves_the_thinking_out_of_the_content(
        judge_profile: JudgeProfile) -> None:
    judge = judge_profile("reasoning-field", thinking_tokens=100)
    reply = client(judge).chat.completions.create(model=MODEL, messages=messages(*WRONG),
                                                  max_tokens=4096, temperature=0.0)
    message = reply.choices[0].message
    assert message.content is not None and json.loads(message.content)["score"] == 1
    reasoning = getattr(message, "reasoning_content", None)
    assert isinstance(reasoning, str) and reasoning == getattr(message, "reasoning", None)
    assert '{"score": 10}' in reasoning and "<think>" not in reasoning
    assert len(reasoning) == 100 * 4
    usage = reply.usage
    assert usage is not None and usage.completion_tokens_details is not None
    reasoning_tokens = usage.completion_tokens_details.reasoning_tokens
    assert reasoning_tokens == math.ceil(len("<think>\n" + reasoning + "\n</think>\n\n") / 4)
    assert usage.completion_tokens == math.ceil(
        len("<think>\n" + reasoning + "\n</think>\n\n" + message.content) / 4)


def test_reasoning_field_cut_inside_the_thinking_has_no_content(
        judge_profile: JudgeProfile) -> None:
    judge = judge_profile("reasoning-field")
    reply = post(judge, messages=messages(*RIGHT), max_tokens=64).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    assert choice["message"]["reasoning_content"].startswith("Let me grade")
    assert reply["usage"]["completion_tokens"] == 64
    assert reply["usage"]["completion_tokens_details"] == {"reasoning_tokens": 64}


def test_thinking_logprobs_peak_at_the_draft_inside_and_the_verdict_after(
        judge_profile: JudgeProfile) -> None:
    judge = judge_profile("think-in-content", thinking_tokens=32)
    reply = client(judge).chat.completions.create(
        model=MODEL, messages=messages(*RIGHT), max_tokens=4096, logprobs=True,
        top_logprobs=3)
    content = reply.choices[0].message.content
    assert reply.choices[0].logprobs is not None and content is not None
    tokens = reply.choices[0].logprobs.content or []
    assert "".join(t.token for t in tokens) == content
    peaks = [(t.token, t.top_logprobs[0].token) for t in tokens if len(t.top_logprobs) > 1]
    assert peaks == [("1", "1"), ("10", "10")]  # the draft first, then the verdict


# -------------------------------------------------------------------- digit-logprobs


def recovered_expectation(entries: list[dict[str, Any]]) -> tuple[float, bool]:
    """Read the score back from digit-by-digit logprobs the way they are documented:
    (expectation, whether every value was resolved). A "1" at the first digit is split
    into 1 and 10 by the next position's alternatives when the path went through "1";
    otherwise it cannot be told apart and the result says so."""
    first = next(i for i, e in enumerate(entries) if e["token"].isdigit())
    alternatives = {t["token"]: math.exp(t["logprob"]) for t in entries[first]["top_logprobs"]}
    dist: dict[int, float] = {}
    resolved = True
    for token, p in alternatives.items():
        if token != "1":
            dist[int(token)] = p
        elif entries[first]["token"] == "1":
            after = {t["token"]: math.exp(t["logprob"])
                     for t in entries[first + 1]["top_logprobs"]}
            dist[10] = p * after.get("0", 0.0)
            dist[1] = p * (1.0 - after.get("0", 0.0))
        else:
            resolved = False
    return math.fsum(k * p for k, p in dist.items()), resolved


@pytest.mark.parametrize(("how", "confidence"), [("inward", 0.8), ("down", 0.7), ("up", 0.7)])
def test_digit_logprobs_carry_the_intended_distribution_over_the_whole_scale(
        judge_profile: JudgeProfile, how: str, confidence: float) -> None:
    # A wrong answer grades 1; a per-model offset lifts it to every value of the scale.
    offsets = {f"judge-{k}": k - 1 for k in range(1, 11)}
    judge = judge_profile("digit-logprobs", digit_confidence=confidence, digit_neighbour=how,
                          model_offsets=offsets)
    for score in range(1, 11):
        body = post(judge, messages=messages(*WRONG), model=f"judge-{score}", logprobs=True,
                    top_logprobs=20, max_tokens=64).json()
        content = body["choices"][0]["message"]["content"]
        assert json.loads(content)["score"] == score
        entries = body["choices"][0]["logprobs"]["content"]
        assert [e["token"] for e in entries] == digit_tokens(content)
        assert "10" not in [e["token"] for e in entries]  # never one token for 10
        first = next(i for i, e in enumerate(entries) if e["token"].isdigit())
        dist = intended_distribution(score, confidence, how)
        by_first: dict[str, float] = {}
        for value, p in dist.items():
            by_first[str(value)[0]] = by_first.get(str(value)[0], 0.0) + p
        top = {t["token"]: math.exp(t["logprob"]) for t in entries[first]["top_logprobs"]}
        assert top == pytest.approx(by_first)
        if score == 10:
            assert entries[first + 1]["token"] == "0"
        if score in (1, 10):
            after = {t["token"]: math.exp(t["logprob"])
                     for t in entries[first + 1]["top_logprobs"]}
            p1, p10 = dist.get(1, 0.0), dist.get(10, 0.0)
            assert after.get("0", 0.0) == pytest.approx(p10 / (p1 + p10))
            assert sum(after.values()) == pytest.approx(1.0)
            assert set(after) <= {"0", ","}
        expectation, resolved = recovered_expectation(entries)
        meant = intended_expectation(score, confidence, how)
        assert meant == pytest.approx(confidence * score
                                      + (1 - confidence) * neighbour(score, how))
        if resolved:
            assert expectation == pytest.approx(meant)
        else:  # "1" shown only as an alternative: 1 or 10 cannot be told from the reply
            assert (how, score) in {("up", 9), ("down", 2)}


def test_digit_logprobs_end_the_number_with_the_json_token_that_follows(
        background_judge: Callable[..., BackgroundJudgeServer]) -> None:
    server = background_judge(profile="digit-logprobs", digit_confidence=0.9,
                              digit_neighbour="down")
    sdk = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    reply = sdk.chat.completions.create(model=MODEL, messages=messages(*RIGHT),
                                        response_format=SCORE_SCHEMA,
                                        logprobs=True, top_logprobs=5)
    assert reply.choices[0].message.content == '{"score": 10}'
    assert reply.choices[0].logprobs is not None
    tokens = reply.choices[0].logprobs.content or []
    assert [t.token for t in tokens] == ['{"', "score", '":', " ", "1", "0", "}"]
    first = {t.token: math.exp(t.logprob) for t in tokens[4].top_logprobs}
    assert first == pytest.approx({"1": 0.9, "9": 0.1})
    after = {t.token: math.exp(t.logprob) for t in tokens[5].top_logprobs}
    assert after == pytest.approx({"0": 1.0})


def test_digit_logprobs_without_logprobs_answer_like_plain(judge_profile: JudgeProfile) -> None:
    judge = judge_profile("digit-logprobs")
    reply = post(judge, messages=messages(*WRONG), max_tokens=64).json()
    assert json.loads(reply["choices"][0]["message"]["content"])["score"] == INCORRECT_SCORE
    assert reply["choices"][0]["logprobs"] is None


# ------------------------------------------------------------ refuse-response-format


@pytest.mark.parametrize("profile", ["plain", "openai-reasoning", "think-in-content"])
def test_refuse_response_format_answers_the_400_of_an_endpoint_without_it(
        judge_profile: JudgeProfile, profile: str) -> None:
    judge = judge_profile(profile, refuse_response_format=True)
    with pytest.raises(openai.BadRequestError) as caught:
        client(judge).chat.completions.create(model=MODEL, messages=messages(*RIGHT),
                                              response_format=SCORE_SCHEMA)
    assert error_of(caught.value) == {
        "message": "Invalid parameter: 'response_format' of type 'json_schema' is not "
                   "supported with this model. Learn more about supported models at the "
                   "Structured Outputs guide: "
                   "https://platform.openai.com/docs/guides/structured-outputs",
        "type": "invalid_request_error", "param": "response_format", "code": None}
    # The same request without it, or with the plain text format, is answered.
    for extra in ({}, {"response_format": {"type": "text"}}):
        response = post(judge, messages=messages(*RIGHT), max_completion_tokens=4096, **extra)
        assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------- stats


def test_stats_record_what_the_judge_was_shown(judge: JudgeProcess) -> None:
    long_answer = "The answer is 42. " + "x" * 5000
    shown = [("What is 6 x 7?", "<think>scratch</think>The answer is 42.", "42"),
             ("What is 6 x 7?", "The answer is 42.<|im_end|>", "42"),
             ("What is 6 x 7?", "The answer is 42.</s>", "42"),
             ("What is 6 x 7?", long_answer, "42"),
             ("What is 6 x 7?", "<reasoning>hm", "42")]
    for prompt, response, reference in shown:
        post(judge, messages=messages(prompt, response, reference), temperature=0,
             max_tokens=64)
    # A thinking mark in the PROMPT section is not the response's.
    post(judge, messages=messages("Think <think> hard", "The answer is 42.", "42"))
    post(judge, messages=[{"role": "user", "content": "not a rewardq prompt </s>"}],
         extra_field=1)
    stats = judge.stats()
    assert stats["requests_with_thinking"] == 2
    assert stats["requests_with_end_of_turn"] == 2
    assert stats["max_response_chars"] == len(long_answer)
    assert stats["params_seen"] == {"model": 7, "messages": 7, "temperature": 5,
                                    "max_tokens": 5, "extra_field": 1}
    recent: list[Any] = judge.requests()
    assert recent[-1]["params"] == ["extra_field", "messages", "model"]
    judge.reset_stats()
    stats = judge.stats()
    assert (stats["params_seen"], stats["requests_with_thinking"],
            stats["requests_with_end_of_turn"], stats["max_response_chars"],
            stats["finish_reasons"], stats["reasoning_tokens_total"]) == ({}, 0, 0, 0, {}, 0)


def test_stats_inspect_every_response_of_a_group_prompt(judge: JudgeProcess) -> None:
    group = ("rewardq-group v1 pairwise\n<<<PROMPT>>>\nWhat is 6 x 7?\n<<<END PROMPT>>>\n"
             "<<<RESPONSE A>>>\nThe answer is 42.\n<<<END RESPONSE A>>>\n"
             "<<<RESPONSE B>>>\n<think>hm</think>42<|eot_id|>\n<<<END RESPONSE B>>>")
    reply = post(judge, messages=[{"role": "user", "content": group}]).json()
    assert json.loads(reply["choices"][0]["message"]["content"])["winner"] in ("A", "B", "tie")
    stats = judge.stats()
    assert (stats["requests_with_thinking"], stats["requests_with_end_of_turn"]) == (1, 1)
    assert stats["max_response_chars"] == len("<think>hm</think>42<|eot_id|>")


# ------------------------------------------------------------- config and command line


def test_profile_knobs_are_validated(judge: JudgeProcess) -> None:
    for bad in ({"profile": "gpt-9"}, {"digit_confidence": 0.3}, {"thinking_tokens": 0},
                {"reasoning_tokens": {"extreme": 5}}, {"digit_neighbour": "sideways"},
                {"refuse_response_format": "yes"}, {"model_profiles": {"m": "gpt-9"}}):
        response = httpx.post(judge.root + "/admin/config", json=bad, timeout=10)
        assert response.status_code == 400, bad
    assert judge.configure()["profile"] == "plain"
    with pytest.raises(ConfigValueError):
        JudgeConfig().updated({"reasoning_tokens": {"high": -1}})


def parse(*flags: str) -> JudgeConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(flags)))


def test_command_line_sets_every_profile_knob() -> None:
    config = parse("--profile", "think-in-content", "--thinking-tokens", "900",
                   "--model-profile", "judge-o=openai-reasoning",
                   "--refuse-response-format", "--reasoning-tokens", "high=9000",
                   "--digit-confidence", "0.65", "--digit-neighbour", "up")
    assert config.profile_for("judge-o") == "openai-reasoning"
    assert config.profile_for("other") == "think-in-content"
    assert (config.profile, config.thinking_tokens, config.refuse_response_format,
            config.reasoning_tokens_for("high"), config.reasoning_tokens_for("low"),
            config.digit_confidence, config.digit_neighbour) == (
        "think-in-content", 900, True, 9000, dict(DEFAULT_REASONING_TOKENS)["low"], 0.65, "up")
    assert parse() == JudgeConfig()
    with pytest.raises(ConfigValueError):
        parse("--reasoning-tokens", "extreme=5")
    with pytest.raises(ConfigValueError):
        parse("--model-profile", "judge-o=gpt-9")


def test_help_documents_every_profile_and_option() -> None:
    out = subprocess.run([sys.executable, "-m", "rewardq.cli", "judge-server", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for word in ("--profile", "plain", "openai-reasoning", "think-in-content",
                 "reasoning-field", "digit-logprobs", "--refuse-response-format",
                 "--thinking-tokens", "--reasoning-tokens", "--digit-confidence",
                 "--think-tag-in-prompt",
                 "--model-profile",
                 "--digit-neighbour", "max_completion_tokens", "unsupported_parameter",
                 "reasoning_content", "one token per 4 characters"):
        assert word in out.stdout, word
