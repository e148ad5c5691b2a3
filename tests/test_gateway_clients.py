"""The gateway driven by the RL frameworks' own remote-reward client code.

The clients are the frameworks' code, copied with repository, path and commit named
(``tests/vendor/``): OpenRLHF 0.11's ``SingleTurnAgentExecutor`` (one aiohttp POST per
rollout, 5 tries 1 s apart, then the rollout keeps a ``None`` reward), OpenRLHF 0.8's
``remote_rm_fn`` (the whole step in one ``requests`` POST per URL) with the code that
reads its reply, and slime's ``remote_rm`` / ``batched_async_rm``. What they talk to is
real: ``rewardq serve`` as a child process, celery workers, the local judge over HTTP.

The OpenRLHF 0.11 executor runs on a stand-in for the vLLM engine (it returns the
rollout's token ids) and a real ``transformers`` tokenizer whose end-of-sequence token
is ``<|im_end|>``, so that ``tokenizer.decode(..., skip_special_tokens=False)`` makes
the query exactly as it does with a ChatML model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import torch
from gateway_harness import GatewayProcess, running_gateway
from scoring_data import expected
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from vendor import openrlhf_agent, openrlhf_remote_rm_v08, slime_rm_hub

from rewardq.broker.settings import Settings
from rewardq.stack import JudgeProcess

TEAM_A = "tok-a-" + "A" * 26
TOKENS = {"REWARDQ_API_TOKENS": f"team-a:{TEAM_A}"}
AUTH_A = {"Authorization": f"Bearer {TEAM_A}"}
END_OF_TURN = "<|im_end|>"
#: ChatML, the chat template of Qwen's instruct models.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ---------------------------------------------------------------------- the clients' world

def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (every text round-trips) with ChatML's end-of-turn token
    as its EOS, as Qwen's instruct models have."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TURN,
                                   pad_token="<|endoftext|>")


@dataclass
class SamplingParams:
    """The fields of vLLM's ``SamplingParams`` the executor reads."""

    max_tokens: int | None = 1024
    logprobs: int | None = None


@dataclass
class _Completion:
    token_ids: list[int]
    finish_reason: str = "stop"
    logprobs: Any = None


@dataclass
class _RequestOutput:
    outputs: list[_Completion]


@dataclass
class PolicyEngine:
    """Stands in for the vLLM engine: answers each prompt with its rollout's tokens and
    the end-of-sequence token, as a chat model stops."""

    tokenizer: PreTrainedTokenizerFast
    rollouts: dict[str, str]
    eos: bool = True

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       multi_modal_data: Any = None) -> _RequestOutput:
        prompt = self.tokenizer.decode(prompt_token_ids, skip_special_tokens=False)
        ids = self.tokenizer(self.rollouts[prompt], add_special_tokens=False)["input_ids"]
        if self.eos:
            ids = [*ids, self.tokenizer.eos_token_id]
        return _RequestOutput([_Completion(ids)])


def math_item(i: int, tag: str, *, right: bool = True) -> dict[str, Any]:
    """A correctness item: prompt, a right or wrong answer, the reference."""
    a, b = i % 89, i // 89 + 3
    answer = a + b if right else a + b + 1
    return {"id": f"{tag}-{i}", "prompt": f"[{tag}] What is {a} + {b}?",
            "response": f"Let me think. The answer is {answer}.", "reference": str(a + b)}


def run_openrlhf_011(url: str | list[str], items: list[dict[str, Any]],
                     labels: list[Any] | None = None, *, eos: bool = True
                     ) -> list[dict[str, Any]]:
    """Every item as one rollout of OpenRLHF 0.11's executor, all at once (the executor
    scores each rollout the moment it is generated); its outputs, in order."""
    tokenizer = chat_tokenizer()
    engine = PolicyEngine(tokenizer, {i["prompt"]: i["response"] for i in items}, eos=eos)
    executor = openrlhf_agent.SingleTurnAgentExecutor(url)
    labels = labels if labels is not None else [i.get("reference") for i in items]

    async def rollouts() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(
            executor.execute(item["prompt"], label, SamplingParams(), 4096, tokenizer, engine)
            for item, label in zip(items, labels, strict=True))))

    return asyncio.run(rollouts())


@dataclass
class SlimeArgs:
    """The fields of slime's ``args`` that ``async_rm`` reads."""

    rm_url: str
    rm_type: str = "remote_rm"
    custom_rm_path: str | None = None


@dataclass
class SlimeSample:
    """The fields of slime's ``Sample`` that ``async_rm`` reads."""

    prompt: Any
    response: str
    label: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    custom_rm_path: str | None = None


def run_slime(url: str, samples: list[SlimeSample]) -> list[Any]:
    async def score() -> list[Any]:
        try:
            return list(await slime_rm_hub.batched_async_rm(SlimeArgs(url), samples))
        finally:
            await slime_rm_hub.close_shared_session()

    return asyncio.run(score())


def with_token(gw: GatewayProcess, path: str) -> str:
    """The URL as ``--reward.remote_url`` / ``--rm-url`` carry the token."""
    return gw.url.replace("http://", f"http://team-a:{TEAM_A}@") + path


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(part.split("=", 1) for part in
                         line.split(" ")[0].partition("{")[2].rstrip("}").split(",") if part)
            if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def gateway(settings: Settings) -> Iterator[GatewayProcess]:
    with running_gateway(settings, extra_env=TOKENS) as gw:
        yield gw


# ---------------------------------------------------------------------- OpenRLHF 0.11

def test_openrlhf_011_and_slime_through_a_15s_judge_outage_every_rollout_gets_its_reward(
        settings: Settings, workers, judge: JudgeProcess, gateway: GatewayProcess) -> None:
    # Every judge call answers 500 for 15 s: longer than OpenRLHF's own retry window (5
    # tries 1 s apart, ~12 s when each try got a quick 502) and than the workers' retries
    # (~1.5 s), so only the gateway's rounds within the request's deadline carry it.
    workers(1)
    items = [math_item(i, "outage", right=i % 2 == 0) for i in range(8)]
    slime_items = [math_item(i, "outage-slime") for i in range(4)]
    judge.configure(error_rate=1.0, error_kinds=["500"])
    outputs: list[dict[str, Any]] = []
    slime_rewards: list[Any] = []
    clients = [
        threading.Thread(target=lambda: outputs.extend(
            run_openrlhf_011(with_token(gateway, "/get_reward"), items))),
        threading.Thread(target=lambda: slime_rewards.extend(run_slime(
            with_token(gateway, "/slime/reward"),
            [SlimeSample(i["prompt"], i["response"], i["reference"]) for i in slime_items]))),
    ]
    for client in clients:
        client.start()
    time.sleep(15)
    failed_during_outage = judge.stats()["responses_by_status"].get("500", 0)
    judge.configure(error_rate=0.0)
    for client in clients:
        client.join(timeout=150)
    assert failed_during_outage >= len(items) + len(slime_items)  # the outage was real
    rewards = [output["reward"] for output in outputs]
    assert None not in rewards
    assert rewards == [[expected(i)[0]] for i in items]
    for item, output in zip(items, outputs, strict=True):  # the tensors OpenRLHF makes
        info, reward, score = openrlhf_agent.reward_tensors(output)
        assert reward is not None and score is not None
        assert reward.flatten().tolist() == score.flatten().tolist() == [expected(item)[0]]
        assert info["rewardq_ok"].flatten().tolist() == [1.0]
    assert slime_rewards == [expected(i)[0] for i in slime_items]
    assert metric(gateway, "rewardq_gateway_items_rescored_total") >= len(items)
    assert metric(gateway, "rewardq_gateway_requests_total", code="502") == 0


def test_a_step_8x_the_token_concurrency_waits_instead_of_429_every_reward_a_number(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    # 1,024 prompts x 8 rollouts against the default 1,024 requests per token, scaled
    # down with the same ratio: 16 prompts x 8 rollouts = 128 requests, 16 scored at once.
    workers(2)
    judge.configure(latency_ms=300)
    limited = settings.model_copy(update={"gateway_token_concurrency": 16})
    items = [math_item(p * 8 + r, "step", right=r % 2 == 0) for p in range(16) for r in range(8)]
    peak_queued = 0.0
    with running_gateway(limited, extra_env=TOKENS) as gw:
        done = threading.Event()

        def watch() -> None:
            nonlocal peak_queued
            while not done.is_set():
                peak_queued = max(peak_queued, metric(gw, "rewardq_gateway_requests_queued",
                                                      token="team-a"))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            outputs = run_openrlhf_011(with_token(gw, "/get_reward"), items)
        finally:
            done.set()
            watcher.join()
        refused = metric(gw, "rewardq_gateway_requests_total", code="429")
        answered = metric(gw, "rewardq_gateway_requests_total", endpoint="/get_reward",
                          code="200")
    rewards = [output["reward"] for output in outputs]
    assert None not in rewards
    assert rewards == [[expected(i)[0]] for i in items]
    assert refused == 0 and answered == len(items)  # one request per rollout, none retried
    assert peak_queued >= 16  # requests did wait for a slot: backpressure, not refusal


def test_a_chat_end_of_turn_token_never_reaches_the_judge(
        settings: Settings, workers, judge: JudgeProcess, gateway: GatewayProcess) -> None:
    workers(1)
    items = [math_item(i, "eot", right=i % 3 != 0) for i in range(16)]
    outputs = run_openrlhf_011(with_token(gateway, "/get_reward"), items)
    # The queries the executor sent do end in the token (decoded with special tokens).
    tokenizer = chat_tokenizer()
    ids = tokenizer(items[0]["response"], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode([*ids, tokenizer.eos_token_id],
                            skip_special_tokens=False).endswith(END_OF_TURN)
    assert [o["reward"] for o in outputs] == [[expected(i)[0]] for i in items]
    seen = judge.requests()
    assert len(seen) == len(items)
    assert not [r for r in seen if END_OF_TURN in r["user"]]
    assert judge.stats().get("requests_with_end_of_turn", 0) == 0
    # slime's responses carry it too when its rollout keeps special tokens.
    slime = run_slime(with_token(gateway, "/slime/reward"), [SlimeSample(
        "[eot-slime] What is 40 + 2?", "The answer is 42." + END_OF_TURN, "42")])
    assert slime == [expected({"prompt": "[eot-slime] What is 40 + 2?",
                               "response": "The answer is 42.", "reference": "42"})[0]]
    assert not [r for r in judge.requests() if END_OF_TURN in r["user"]]
    # --apply_chat_template: OpenRLHF's dataset renders each prompt with the tokenizer's
    # chat template (ChatML here, as Qwen's); the judge reads the question, not the markup.
    tokenizer.chat_template = CHATML
    chat = [math_item(i, "chat") for i in range(4)]
    for item in chat:
        item["question"] = item["prompt"]
        item["prompt"] = tokenizer.apply_chat_template(
            [{"role": "user", "content": item["question"]}], tokenize=False,
            add_generation_prompt=True)
        assert item["prompt"].startswith("<|im_start|>user\n[chat] What is")
    before = judge.stats()["requests_total"]
    outputs = run_openrlhf_011(with_token(gateway, "/get_reward"), chat)
    assert [o["reward"] for o in outputs] == [[expected(i)[0]] for i in chat]
    shown = [r["user"] for r in judge.requests()[-len(chat):]]
    assert judge.stats()["requests_total"] == before + len(chat)
    assert sorted(i["question"] for i in chat) == sorted(
        q for u in shown for q in (i["question"] for i in chat) if q in u)
    assert not [u for u in shown if "<|im_start|>" in u or "<|im_end|>" in u]
    # --reward.remote_url URL,URL splits each one-rollout batch: the second URL gets
    # empty lists, answered with empty lists; the reward comes from the first.
    split = run_openrlhf_011([with_token(gateway, "/get_reward")] * 2, items[:2])
    assert [o["reward"] for o in split] == [[expected(i)[0]] for i in items[:2]]


LABELS_OF_144 = [("string", "144"), ("number", 144), ("dict ground_truth", {"ground_truth": "144"}),
                 ("dict answer", {"answer": 144, "source": "gsm8k"}), ("list", ["144"]),
                 ("list of dict", [{"reference": "144"}])]


def test_labels_of_any_json_shape_give_the_reference_or_a_422_naming_the_label(
        settings: Settings, workers, judge: JudgeProcess, gateway: GatewayProcess) -> None:
    workers(1)
    prompt = "[labels] What is 12 * 12?"
    right = {"id": "r", "prompt": prompt, "response": "12 * 12 = 144. The answer is 144.",
             "reference": "144"}
    wrong = {**right, "id": "w", "prompt": "[labels, again] What is 12 * 12?",
             "response": "12 * 12 = 146. The answer is 146."}
    right_score, wrong_score = expected(right)[0], expected(wrong)[0]
    assert right_score != wrong_score  # the correctness rubric tells them apart
    for name, label in LABELS_OF_144:
        outputs = run_openrlhf_011(with_token(gateway, "/get_reward"), [right, wrong],
                                   [label, label])
        assert [o["reward"] for o in outputs] == [[right_score], [wrong_score]], name
    slime = run_slime(with_token(gateway, "/slime/reward"), [
        SlimeSample(prompt, right["response"], {"ground_truth": "144"}),
        SlimeSample(prompt, wrong["response"], ["144"])])
    assert slime == [right_score, wrong_score]

    # Labels with no reference answer refuse the request, naming the label; never a
    # quietly different rubric.
    for label in [None, "", "   ", True, {"question_id": 7}, ["144", "145"], []]:
        body = {"query": [prompt + right["response"]], "prompts": [prompt], "labels": [label]}
        reply = httpx.post(f"{gateway.url}/get_reward", json=body, headers=AUTH_A, timeout=30)
        assert reply.status_code == 422, (label, reply.text)
        assert reply.json()["problems"][0]["field"] == "labels[0]"
        assert "labels[0] = " in reply.json()["message"] and "label_as=metadata" in \
            reply.json()["message"]
        slime_reply = httpx.post(f"{gateway.url}/slime/reward", headers=AUTH_A, timeout=30,
                                 json={"prompt": prompt, "response": "144", "label": label})
        assert slime_reply.status_code == 422 and "label = " in slime_reply.json()["message"]
    # A run without references says so, and gets the quality rubric.
    quality = httpx.post(f"{gateway.url}/get_reward?label_as=metadata", headers=AUTH_A,
                         timeout=30, json={"query": [prompt + right["response"]],
                                           "prompts": [prompt], "labels": [None]})
    assert quality.json()["rewards"] == [expected({**right, "reference": None})[0]]


# ---------------------------------------------------------------------- OpenRLHF 0.8

@dataclass
class Samples:
    """The fields of OpenRLHF 0.8's ``Experience`` that ``update_samples_with_rewards``
    reads and writes: one micro-batch of sequences."""

    sequences: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    rewards: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def openrlhf_08_step(urls: list[str], items: list[dict[str, Any]], per_batch: int
                     ) -> list[Samples]:
    """``make_experience``'s remote-RM path: the step's queries in one ``get_rewards``
    call, then ``update_samples_with_rewards`` over its micro-batches."""
    queries = [i["prompt"] + i["response"] for i in items]
    rewards_info = openrlhf_remote_rm_v08.get_rewards(
        urls, queries, [i["prompt"] for i in items], [i["reference"] for i in items])
    samples = [Samples(torch.zeros(min(per_batch, len(items) - s), 4, dtype=torch.long))
               for s in range(0, len(items), per_batch)]
    return openrlhf_remote_rm_v08.update_samples_with_rewards(rewards_info, samples)


def test_openrlhf_08_step_completes_with_extra_logs_off_and_a_large_batch_past_the_item_limit(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    # The old-style client sends the whole step in one request. Scaled down: the
    # /v1/score item limit at 100 and a step of 300 rollouts (10,000 and 30,000).
    workers(2)
    small = settings.model_copy(update={"gateway_max_items": 100,
                                        "gateway_rm_max_items": 1000})
    items = [math_item(i, "v08", right=i % 3 != 0) for i in range(300)]
    want = [expected(i)[0] for i in items]
    with running_gateway(small, extra_env=TOKENS) as gw:
        url = with_token(gw, "/get_reward")
        samples = openrlhf_08_step([url + "?extra_logs=0"], items, per_batch=16)
        got = torch.cat([s.rewards for s in samples]).tolist()
        assert got == pytest.approx(want)
        assert torch.cat([s.info["score"] for s in samples]).tolist() == pytest.approx(want)
        # The same step split over two URLs (--remote_rm_url URL,URL): two requests.
        split = openrlhf_08_step([url + "?extra_logs=0"] * 2, items, per_batch=16)
        assert torch.cat([s.rewards for s in split]).tolist() == pytest.approx(want)
        # Why the switch exists: 0.8.x concatenates extra_logs as tensors, and JSON
        # lists are not; with them on, its step fails where it reads the reply.
        with pytest.raises(TypeError):
            openrlhf_08_step([url], items[:16], per_batch=16)
        # Past the remote-RM limit: a 413 that says how to split.
        too_many = httpx.post(f"{gw.url}/get_reward", headers=AUTH_A, timeout=30, json={
            "query": ["q"] * 1001, "prompts": ["p"] * 1001, "labels": ["1"] * 1001})
        assert too_many.status_code == 413 and "--remote_rm_url" in too_many.json()["message"]
        answered = metric(gw, "rewardq_gateway_requests_total", endpoint="/get_reward",
                          code="200")
    assert answered == 4  # one request per URL per step, none retried


# ---------------------------------------------------------------------- per-item outcomes

def test_empty_and_invalid_rollouts_fail_alone_and_permanent_failures_say_which(
        settings: Settings, workers, judge: JudgeProcess, gateway: GatewayProcess) -> None:
    workers(1)
    good = [math_item(i, "alone") for i in range(3)]
    # An empty rollout, and one that is only the end-of-turn token: nothing to judge.
    batch = [good[0], {**good[1], "response": ""}, {**good[2], "response": END_OF_TURN}]
    url = with_token(gateway, "/get_reward")
    [reply] = openrlhf_remote_rm_v08.get_rewards(
        [url], [i["prompt"] + i["response"] for i in batch], [i["prompt"] for i in batch],
        [i["reference"] for i in batch])
    assert reply["rewards"] == [expected(good[0])[0], 0.0, 0.0]
    assert reply["extra_logs"]["rewardq_no_answer"] == [0.0, 1.0, 1.0]
    assert reply["extra_logs"]["rewardq_ok"] == [1.0, 0.0, 0.0]

    # An item the broker refuses (a reference past its size limit) fails alone: with a
    # failed reward set the others are scored, without one the 502 names it.
    huge = {**math_item(5, "alone"), "reference": "9" * 70_000}
    body = {"query": [good[0]["prompt"] + good[0]["response"], huge["prompt"] + "x"],
            "prompts": [good[0]["prompt"], huge["prompt"]],
            "labels": [good[0]["reference"], huge["reference"]]}
    fixed = httpx.post(f"{gateway.url}/get_reward?failed_reward=-1", json=body,
                       headers=AUTH_A, timeout=60)
    assert fixed.status_code == 200 and fixed.json()["rewards"] == [expected(good[0])[0], -1.0]
    refused = httpx.post(f"{gateway.url}/get_reward", json=body, headers=AUTH_A, timeout=60)
    assert refused.status_code == 502
    [named] = refused.json()["items"]
    assert (named["index"], named["status"], named["permanent"]) == (1, "invalid", True)
    assert "reference" in named["error"]

    # A judge that refuses the request (400) is a permanent failure: asked once, not sent
    # again, and the 502 says so; the client's retries would get the same.
    judge.configure(error_rate=1.0, error_kinds=["400"])
    judge.reset_stats()
    fresh = math_item(9, "alone-400")
    failed = httpx.post(f"{gateway.url}/get_reward", headers=AUTH_A, timeout=60, json={
        "query": [fresh["prompt"] + fresh["response"]], "prompts": [fresh["prompt"]],
        "labels": [fresh["reference"]]})
    assert judge.stats()["requests_total"] == 1
    assert failed.status_code == 502 and failed.json()["error"] == "not_scored"
    [named] = failed.json()["items"]
    assert named["permanent"] is True and "HTTP 400" in named["error"]
