"""The judge's view of a rollout, the request each judge model takes, and reading the
verdict, never the thinking: pure functions, no processes."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewardq.broker.errors import CutReplyError, PermanentJudgeError, RefusedParameterError
from rewardq.broker.keys import judge_fingerprints
from rewardq.broker.schemas import JudgeOptions, ResultStatus, ScoreItem, ScoreResult, Usage
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import ChatReply, answer_text, judge_request, judge_spec, read_reply
from rewardq.judge.judge_request import (
    DEFAULT_MAX_TOKENS,
    REASONING_MAX_TOKENS,
    LearnedRequests,
    model_family,
    request_body,
)
from rewardq.judge.rollout_view import END_OF_TURN_TOKENS, NoAnswer, rollout_view, view_items
from rewardq.judge.rubrics import builtin_rubrics
from rewardq.judge.verdicts import http_error, refused_param

# -- the rollout view -----------------------------------------------------------------


def test_the_final_answer_follows_the_last_closing_tag() -> None:
    rollout = '<think>draft {"score": 1} ... </think>\n\nFirst try.<think>more</think> 42<|im_end|>'
    assert rollout_view(rollout) == "42"


@pytest.mark.parametrize("tags", [("<think>", "</think>"), ("<thinking>", "</thinking>"),
                                  ("<reasoning>", "</reasoning>"), ("<THINK>", "</THINK>")])
def test_every_thinking_tag_is_recognised(tags: tuple[str, str]) -> None:
    opening, closing = tags
    assert rollout_view(f"{opening}secret{closing}answer") == "answer"
    assert isinstance(rollout_view(f"{opening}secret, cut here"), NoAnswer)


def test_a_rollout_cut_inside_its_thinking_has_no_answer() -> None:
    shown = rollout_view("<think>" + "step " * 10_000)
    assert isinstance(shown, NoAnswer) and "never closed" in shown.reason


def test_a_prompt_that_opens_thinking_means_the_rollout_starts_inside_it() -> None:
    prompt = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert rollout_view("6*7 is 42.\n</think>\n\n42", prompt=prompt) == "42"
    assert isinstance(rollout_view("6*7 is... still thinking", prompt=prompt), NoAnswer)
    assert rollout_view("42", prompt="<think>x</think> What is 6*7?") == "42"


@pytest.mark.parametrize("response", ["", "   \n", "<|im_end|>", "<think>all thinking</think>\n"])
def test_nothing_to_judge_is_no_answer(response: str) -> None:
    assert isinstance(rollout_view(response), NoAnswer)


def test_a_rollout_without_tags_is_all_answer() -> None:
    assert rollout_view("  The answer is 4.\n") == "The answer is 4."


@given(st.text(max_size=40), st.sampled_from(END_OF_TURN_TOKENS),
       st.sampled_from(["final_answer", "full"]))
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_end_of_turn_tokens_are_never_shown(text: str, token: str, view: str) -> None:
    shown = rollout_view(f"{text}{token}{token}", view=view)  # type: ignore[arg-type]
    if not isinstance(shown, NoAnswer):
        assert all(t not in shown for t in END_OF_TURN_TOKENS)


def test_the_full_view_keeps_the_thinking_and_caps_head_and_tail() -> None:
    rollout = "<think>" + "a" * 50_000 + "</think>" + "b" * 50_000 + "THE END"
    shown = rollout_view(rollout, view="full", max_tokens=1000)
    assert isinstance(shown, str)
    assert shown.startswith("<think>aaa") and shown.endswith("THE END")
    assert "characters of the rollout left out by rewardq" in shown
    assert len(shown) <= 4000
    omitted = int(shown.split("[… ")[1].split(" characters")[0])
    marker = len(shown) - (len(rollout) - omitted)
    assert 0 < marker < 100  # what was kept and the marker fill the budget
    assert rollout_view(shown, view="full", max_tokens=1000) == shown  # a view of a view


@given(st.text(min_size=0, max_size=3000), st.sampled_from(["final_answer", "full"]),
       st.integers(min_value=16, max_value=400))
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_a_view_of_a_view_is_the_same_view(text: str, view: str, max_tokens: int) -> None:
    shown = rollout_view(text, view=view, max_tokens=max_tokens)  # type: ignore[arg-type]
    if isinstance(shown, str):
        assert len(shown) <= max_tokens * 4
        assert rollout_view(shown, view=view, max_tokens=max_tokens) == shown  # type: ignore[arg-type]


def test_a_long_final_answer_is_capped_too() -> None:
    shown = rollout_view("<think>x</think>" + "y" * 200_000, max_tokens=2048)
    assert isinstance(shown, str) and len(shown) <= 2048 * 4


def test_view_items_answers_no_answer_and_replaces_responses() -> None:
    spec = judge_spec(Settings())
    book = builtin_rubrics()
    items = book.assign([
        ScoreItem(id="a", prompt="q", response="<think>t</think>4<|im_end|>", reference="4"),
        ScoreItem(id="b", prompt="q", response=""),
        ScoreItem(id="c", prompt="q", response="<think>cut"),
        ScoreItem(id="d", prompt="q", response="plain")])
    a, b, c, d = view_items(items, spec, book)
    assert isinstance(a, ScoreItem) and a.response == "4" and a.reference == "4"
    assert isinstance(b, ScoreResult) and b.status is ResultStatus.NO_ANSWER and b.score is None
    assert isinstance(c, ScoreResult) and "never closed" in (c.error or "")
    assert d is items[3]


def test_two_rollouts_with_one_final_answer_share_a_fingerprint_and_the_view_is_keyed() -> None:
    book = builtin_rubrics()
    spec = judge_spec(Settings())
    one, two = (v for v in view_items(book.assign([
        ScoreItem(id="a", prompt="q", response="<think>one way</think>4"),
        ScoreItem(id="b", prompt="q", response="<think>another</think>4")]), spec, book))
    assert isinstance(one, ScoreItem) and isinstance(two, ScoreItem)
    assert judge_fingerprints(spec, [one]) == judge_fingerprints(spec, [two])
    full = judge_spec(Settings(judge_view="full"))
    assert judge_fingerprints(full, [one]) != judge_fingerprints(spec, [one])


# -- the request each judge takes -------------------------------------------------------


@pytest.mark.parametrize(("model", "family"), [
    ("gpt-5-mini", "openai-reasoning"), ("gpt-5.1", "openai-reasoning"),
    ("o3", "openai-reasoning"), ("o4-mini", "openai-reasoning"),
    ("openai/gpt-5-nano", "openai-reasoning"), ("gpt-5-chat-latest", "chat"),
    ("gpt-4.1-mini", "chat"), ("gpt-4o", "chat"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "open-reasoning"),
    ("Qwen/QwQ-32B", "open-reasoning"),
    ("Qwen/Qwen3-8B", "open-reasoning"), ("Qwen/Qwen3-30B-A3B-Instruct-2507", "chat"),
    ("openai/gpt-oss-20b", "open-reasoning"), ("meta-llama/Llama-3.1-8B-Instruct", "chat"),
    ("rewardq-local-judge", "chat")])
def test_model_families(model: str, family: str) -> None:
    assert model_family(model).name == family


def test_an_openai_reasoning_model_gets_only_what_it_takes() -> None:
    spec = judge_spec(Settings(judge_model="gpt-5-mini", judge_score_mode="logprobs"))
    item = ScoreItem(id="a", prompt="q", response="r")
    body = judge_request(spec, builtin_rubrics().rubric_for(spec, item), item)
    assert body["max_completion_tokens"] == REASONING_MAX_TOKENS
    assert not {"max_tokens", "temperature", "logprobs", "top_logprobs"} & body.keys()


def test_per_judge_options_override_the_fleet_and_extra_body_goes_out_as_written() -> None:
    spec = judge_spec(Settings(
        judge_model="Qwen/Qwen3-8B", judge_reasoning_effort="low", judge_max_tokens=100,
        judge_extra_body={"top_k": 20, "chat_template_kwargs": {"enable_thinking": True}},
        judge_options={"Qwen/Qwen3-8B": JudgeOptions(
            max_tokens=4000, extra_body={"chat_template_kwargs": {"enable_thinking": False}})}))
    body = request_body(spec, [{"role": "user", "content": "x"}])
    assert body["max_tokens"] == 4000 and body["reasoning_effort"] == "low"
    assert body["top_k"] == 20 and body["chat_template_kwargs"] == {"enable_thinking": False}
    other = request_body(spec.model_copy(update={"model": "gpt-4o"}),
                         [{"role": "user", "content": "x"}])
    assert other["max_tokens"] == 100 and other["chat_template_kwargs"]["enable_thinking"]


def test_defaults_fit_the_judge() -> None:
    plain = request_body(judge_spec(Settings()), [])
    assert plain["max_tokens"] == DEFAULT_MAX_TOKENS and plain["temperature"] == 0.0


def test_structured_output_asks_for_an_integer_on_the_rubrics_scale() -> None:
    spec = judge_spec(Settings(judge_structured_output=True))
    body = request_body(spec, [], scale=(0, 5))
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["score"] == {"type": "integer", "minimum": 0, "maximum": 5}


def test_request_options_are_part_of_the_cache_key() -> None:
    item = ScoreItem(id="a", prompt="q", response="r")
    keys = {judge_fingerprints(judge_spec(Settings(**kw)), [item])[0] for kw in (
        {}, {"judge_reasoning_effort": "high"}, {"judge_structured_output": True},
        {"judge_extra_body": {"top_k": 5}}, {"judge_max_tokens": 10},
        {"judge_options": {"m": JudgeOptions(temperature=1.0)}})}
    assert len(keys) == 6


# -- learning what an endpoint refuses --------------------------------------------------


def _openai_refusal(param: str, code: str = "unsupported_parameter") -> PermanentJudgeError:
    body = json.dumps({"error": {"message": f"Unsupported parameter: '{param}'",
                                 "type": "invalid_request_error", "param": param,
                                 "code": code}}).encode()
    return http_error(400, {}, "Error code: 400", param=refused_param(400, body))


def test_a_refused_max_tokens_is_sent_as_max_completion_tokens_from_then_on() -> None:
    learned = LearnedRequests()
    body = {"model": "m", "messages": [], "max_tokens": 64, "temperature": 0.0}
    error = _openai_refusal("max_tokens")
    assert isinstance(error, RefusedParameterError)
    retry = learned.retry_body(body, error, "http://judge")
    assert retry == {"model": "m", "messages": [], "max_completion_tokens": 64,
                     "temperature": 0.0}
    retry = learned.retry_body(retry, _openai_refusal("temperature", "unsupported_value"),
                               "http://judge")
    assert retry == {"model": "m", "messages": [], "max_completion_tokens": 64}
    assert learned.adapt(body) == retry  # later calls go out adapted at once
    assert learned.adapt({**body, "model": "other"}) == {**body, "model": "other"}


def test_a_refusal_named_only_in_the_message_is_learned_and_logprobs_go_together() -> None:
    learned = LearnedRequests()
    body = {"model": "m", "messages": [], "logprobs": True, "top_logprobs": 20}
    error = http_error(400, {}, "Error code: 400 - logprobs is not supported with this model")
    assert learned.retry_body(body, error, "e") == {"model": "m", "messages": []}


def test_other_errors_teach_nothing() -> None:
    learned = LearnedRequests()
    body = {"model": "m", "messages": [], "max_tokens": 5}
    assert learned.retry_body(body, http_error(401, {}, "bad key"), "e") is None
    assert learned.retry_body(body, http_error(400, {}, "messages too long"), "e") is None
    assert learned.retry_body(body, _openai_refusal("messages"), "e") is None


# -- reading the verdict, never the thinking ---------------------------------------------


def _reply(content: str | None, finish: str = "stop", **message: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": content, **message},
                                     "finish_reason": finish}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 500,
                                 "completion_tokens_details": {"reasoning_tokens": 480}}}
                      ).encode()


def test_the_verdict_is_read_after_the_thinking() -> None:
    reply = read_reply(_reply('<think>draft {"score": 1}</think>\n{"score": 9}'))
    assert answer_text(reply) == '\n{"score": 9}'
    assert reply.usage == Usage(prompt_tokens=10, completion_tokens=500, reasoning_tokens=480)


def test_a_reasoning_field_is_never_read() -> None:
    reply = read_reply(_reply('{"score": 9}', reasoning_content='{"score": 1}',
                              reasoning='{"score": 1}'))
    assert answer_text(reply) == '{"score": 9}'


@pytest.mark.parametrize(("content", "finish"), [
    ("", "length"), ('<think>draft {"score": 1}', "length"), ('<think>draft {"score": 1}', "stop"),
    ('{"score": 9, "reason": "because', "length")])
def test_a_cut_reply_never_yields_a_score(content: str, finish: str) -> None:
    with pytest.raises(CutReplyError, match="REWARDQ_JUDGE_MAX_TOKENS .now 64."):
        answer_text(read_reply(_reply(content, finish)), 64)


def test_a_reply_without_a_finish_reason_is_read() -> None:
    assert answer_text(ChatReply('{"score": 3}', None)) == '{"score": 3}'
