"""``rewardq.verl`` (the verl adapter, ``rewardq.integrations.verl``, under the path verl
configs name) driven by verl 0.9.1's own reward loop, in both of its paths.

verl's ``RewardLoopWorker`` (its class, built from an OmegaConf config the way the Ray
actor builds it, with an offline tokenizer saved as the model path) runs in two OS
processes of its own (``tests/verl_harness.py``), loads ``RewardqRewardManager`` through
``reward.reward_manager.source=importlib`` and verl's rule function through
``custom_reward_function``, and scores a real ``DataProto`` of GRPO groups:

- batch path: verl's ``pad_dataproto_to_divisor`` + ``chunk`` over three reward-loop
  workers (two in one process, one in the other), ``compute_score_batch`` on each, then
  verl's ``assemble_rm_scores`` — a group straddles chunks, and the padding copies the
  first rows;
- streaming path: every sample alone, unpadded with an all-ones mask and no meta_info,
  through ``compute_score`` on a random one of the two processes, shuffled, at spread
  times, as the agent loop sends finished rollouts.

Every reward is checked against the formula computed here independently
(``tests/penalty_reference.py``, the judge's deterministic grading), and the judge must
have seen exactly one call per distinct judged pair.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl is in the test extra (pip install -e '.[test]')")

from omegaconf import OmegaConf  # noqa: E402  (verl brings it)
from verl import DataProto  # noqa: E402
from verl.protocol import pad_dataproto_to_divisor  # noqa: E402

from rewardq.broker.settings import Settings  # noqa: E402
from rewardq.judge.conversation import conversation_text  # noqa: E402
from rewardq.judge.verdicts import normalize  # noqa: E402
from rewardq.judge_server.grading import expected_raw_score  # noqa: E402
from rewardq.producer.config import LengthPenaltyConfig  # noqa: E402
from rewardq.producer.rewards import exact_final_answer  # noqa: E402
from rewardq.stack import JudgeProcess  # noqa: E402
from rewardq.verl import EXTRA_KEYS, RewardqRewardManager  # noqa: E402

try:
    from tests import penalty_reference as ref
    from tests import verl_harness
    from tests.tokenizer_factory import build_tokenizer, encode
except ImportError:  # pytest put tests/ itself, not the repository root, on sys.path
    import penalty_reference as ref  # type: ignore[no-redef]
    import verl_harness  # type: ignore[no-redef]
    from tokenizer_factory import build_tokenizer, encode  # type: ignore[no-redef]

TESTS = Path(__file__).resolve().parent
GROUPS, N = 8, 4
SYSTEM_PROMPT = "Answer with the final number."
FILLER = ["let me think step by step.", "first we add.", "then we compute the sum.",
          "hmm wait.", "so the result is it.", "yes."]


# --------------------------------------------------------------------------- the rollouts


def rollouts(seed: int) -> list[dict[str, Any]]:
    """GROUPS x N samples: varied lengths, right and wrong answers, all texts distinct."""
    rng = random.Random(seed)
    out = []
    for g in range(GROUPS):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        prompt = f"what is {a} plus {b}?"
        for k in range(N):
            right = k != 1 and rng.random() < 0.75
            value = a + b if right else a + b + 1 + k
            steps = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 3 + 4 * (k % 3))))
            response = f"{steps} {a} plus {b} = {value}. the answer is {value}." if steps \
                else f"the answer is {value}."
            out.append({"prompt": prompt, "response": response,
                        "truth": str(a + b), "uid": f"uid-{seed}-{g}",
                        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": prompt}]})
    return out


def tokenize(tokenizer: Any, samples: list[dict[str, Any]]) -> None:
    for s in samples:
        s["prompt_ids"] = encode(tokenizer, s["prompt"])
        s["response_ids"] = encode(tokenizer, s["response"]) + [tokenizer.eos_token_id]
        # What the judge is shown: verl's raw_prompt (the dataset's messages) where the
        # batch carries it, else the prompt tokens decoded.
        s["prompt_text"] = conversation_text(s["messages"]) if "messages" in s else \
            tokenizer.decode(s["prompt_ids"], skip_special_tokens=True)
        s["response_text"] = tokenizer.decode(s["response_ids"], skip_special_tokens=True)


def non_tensor(samples: list[dict[str, Any]], first: int = 0) -> dict[str, np.ndarray]:
    """The columns verl 0.9.1's trainer and agent loop give a batch: ``raw_prompt`` (the
    dataset's chat messages, ``RLHFDataset``) where the samples have messages, and
    ``priority`` (``AgentLoopManager.generate_sequences``: each sample's position in the
    step's batch, unique per sample; the padding copies carry their original's)."""
    def column(values: list[Any]) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):  # each value whole (a list of messages too)
            out[i] = value
        return out
    return {
        "priority": np.arange(first, first + len(samples), dtype=np.int64),
        "data_source": column(["arith"] * len(samples)),
        "reward_model": column([{"ground_truth": s["truth"], "style": "rule"}
                                for s in samples]),
        "extra_info": column([{"index": i, "split": "train"} for i in range(len(samples))]),
        "uid": column([s["uid"] for s in samples]),
        **({"raw_prompt": column([s["messages"] for s in samples])}
           if all("messages" in s for s in samples) else {}),
    }


def padded_batch(samples: list[dict[str, Any]], pad: int) -> DataProto:
    """The trainer's layout: prompts left-padded, responses right-padded."""
    wp = max(len(s["prompt_ids"]) for s in samples) + 2
    wr = max(len(s["response_ids"]) for s in samples) + 3
    prompts = torch.tensor([[pad] * (wp - len(s["prompt_ids"])) + s["prompt_ids"]
                            for s in samples])
    responses = torch.tensor([s["response_ids"] + [pad] * (wr - len(s["response_ids"]))
                              for s in samples])
    mask = torch.tensor([[0] * (wp - len(s["prompt_ids"])) + [1] * len(s["prompt_ids"])
                         + [1] * len(s["response_ids"]) + [0] * (wr - len(s["response_ids"]))
                         for s in samples])
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": mask,
                 "input_ids": torch.cat([prompts, responses], dim=1)},
        non_tensors=non_tensor(samples), meta_info={"global_steps": 3})


def streamed_sample(sample: dict[str, Any], position: int = 0) -> DataProto:
    """What the agent loop sends for one finished rollout: unpadded, all-ones mask;
    ``position`` is the sample's place in the step's batch (its ``priority``)."""
    prompts = torch.tensor([sample["prompt_ids"]])
    responses = torch.tensor([sample["response_ids"]])
    input_ids = torch.cat([prompts, responses], dim=1)
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "input_ids": input_ids,
                 "attention_mask": torch.ones_like(input_ids)},
        non_tensors=non_tensor([sample], first=position))


# --------------------------------------------------------------------------- expectations


def expected(samples: list[dict[str, Any]], cfg: LengthPenaltyConfig) -> list[float]:
    lengths = [len(s["response_ids"]) for s in samples]
    penalties = ref.length_penalties(lengths, [s["uid"] for s in samples], cfg)
    out = []
    for s, penalty in zip(samples, penalties, strict=True):
        rule = exact_final_answer("arith", s["response_text"], s["truth"])
        judge = normalize(expected_raw_score(s["prompt_text"], s["response_text"], s["truth"])) \
            if rule > 0 else 0.0
        out.append(rule + cfg.reward_coefficient * judge - cfg.penalty_scale * penalty)
    return out


def judged_pairs(samples: list[dict[str, Any]]) -> int:
    return len({(s["prompt_text"], s["response_text"]) for s in samples
                if exact_final_answer("arith", s["response_text"], s["truth"]) > 0})


# --------------------------------------------------------------------------- verl config


@pytest.fixture
def verl_config(tmp_path: Path, settings: Settings) -> Any:
    tokenizer_dir = tmp_path / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer_dir)
    return OmegaConf.create({
        "actor_rollout_ref": {
            "model": {"path": str(tokenizer_dir), "tokenizer_path": None},
            "rollout": {"n": N, "val_kwargs": {"n": 1}},
        },
        "reward": {
            "num_workers": 3,
            "reward_manager": {"source": "importlib", "name": "RewardqRewardManager",
                               "module": {"path": "pkg://rewardq.verl"}},
            "reward_model": {"enable": False},
            "custom_reward_function": {"path": str(TESTS / "verl_rule.py"),
                                       "name": "compute_score", "reward_kwargs": {}},
            "reward_kwargs": {"rewardq": {
                "use_async_io": True, "penalty_scale": 0.5, "reward_coefficient": 2.0,
                "group_wait_s": 60,
                "settings": {"redis_url": settings.redis_url,
                             "judge_base_url": settings.judge_base_url},
            }},
        },
    })


def harness(config: Any, count: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"),
                               initializer=verl_harness.init, initargs=(config, count))


def check(outputs: list[dict[str, Any]], samples: list[dict[str, Any]],
          cfg: LengthPenaltyConfig) -> None:
    want = expected(samples, cfg)
    for i, (out, reward) in enumerate(zip(outputs, want, strict=True)):
        info = out["reward_extra_info"]
        assert set(EXTRA_KEYS) <= set(info), i
        assert info["group_status"] == "complete" and info["group_size"] == N, (i, info)
        assert abs(out["reward_score"] - reward) < 1e-4, (i, out, reward)


def batch_path(config: Any, data: DataProto) -> list[dict[str, Any]]:
    """``RewardLoopManager.compute_rm_score`` minus Ray: verl pads the batch to three
    reward-loop workers (two in one process, one in the other), chunks it, scores each
    chunk with ``compute_score_batch`` and drops the padding's outputs."""
    padded, pad_size = pad_dataproto_to_divisor(data, 3)
    assert pad_size > 0  # the first rows are copied in
    chunks = padded.chunk(3)
    with harness(config, 2) as first, harness(config, 1) as second:
        futures = [first.submit(verl_harness.compute_score_batch, 0, chunks[0]),
                   second.submit(verl_harness.compute_score_batch, 0, chunks[1]),
                   first.submit(verl_harness.compute_score_batch, 1, chunks[2])]
        return [o for f in futures for o in f.result(timeout=180)][:len(data)]


def streaming_path(config: Any, samples: list[dict[str, Any]], seed: int
                   ) -> list[dict[str, Any]]:
    """The agent loop's streaming: every sample alone, shuffled, at spread times, on a
    random one of two reward-loop processes."""
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    per_process: list[list[int]] = [[], []]
    for i in order:
        per_process[rng.randrange(2)].append(i)
    assert all(per_process)
    with harness(config, 1) as first, harness(config, 1) as second:
        futures = [pool.submit(verl_harness.compute_score_stream, 0,
                               [(rng.uniform(0, 0.8), streamed_sample(samples[i], i))
                                for i in mine])
                   for pool, mine in zip((first, second), per_process, strict=True)]
        outputs: list[dict[str, Any] | None] = [None] * len(samples)
        for future, mine in zip(futures, per_process, strict=True):
            for i, out in zip(mine, future.result(timeout=180), strict=True):
                outputs[i] = out
    assert all(o is not None for o in outputs)
    return [o for o in outputs if o is not None]


def judge_in_groups(config: Any) -> None:
    """Group judging on: listwise, groups of N (training's ``rollout.n``), every sample
    judged; a group that cannot complete ends at a 60 s chunk deadline."""
    options = config.reward.reward_kwargs.rewardq
    options.judge_when = "always"
    options.settings.judge_group_mode = "listwise"
    options.settings.judge_group_size = N
    options.settings.chunk_deadline_s = 60


def streamed_validation_sample(config: Any, rule: Any
                               ) -> tuple[RewardqRewardManager, DataProto, dict[str, Any]]:
    """A manager built from ``config``, and one streamed sample its dataset marks as
    validation (``extra_info.split``), with the sample it was made from."""
    tokenizer = build_tokenizer()
    [sample] = rollouts(seed=4)[:1]
    tokenize(tokenizer, [sample])
    data = streamed_sample(sample)
    data.non_tensor_batch["extra_info"][0]["split"] = "test"
    return RewardqRewardManager(config, tokenizer, rule), data, sample


# --------------------------------------------------------------------------- the tests


def test_batch_path_over_three_workers_in_two_processes(
        verl_config: Any, workers, judge: JudgeProcess) -> None:
    workers(2)
    tokenizer = build_tokenizer()
    samples = rollouts(seed=1)
    tokenize(tokenizer, samples)
    data = padded_batch(samples, tokenizer.pad_token_id)
    cfg = LengthPenaltyConfig(penalty_scale=0.5, reward_coefficient=2.0, use_async_io=True)

    outputs = batch_path(verl_config, data)

    check(outputs, samples, cfg)
    rm_scores = RewardqRewardManager.assemble_rm_scores(data, [o["reward_score"]
                                                               for o in outputs])
    assert rm_scores.dtype == torch.float32 and rm_scores.shape == data.batch["responses"].shape
    for i, s in enumerate(samples):
        row = rm_scores[i]
        last = len(s["response_ids"]) - 1
        assert math.isclose(float(row[last]), outputs[i]["reward_score"], abs_tol=1e-5)
        assert float(row.abs().sum() - row[last].abs()) == 0.0
    assert judge.stats()["requests_total"] == judged_pairs(samples)
    # The judge read the dataset's messages (verl's raw_prompt), not the decoded tokens.
    shown = [request["user"] for request in judge.requests()]
    assert shown and all(f"system: {SYSTEM_PROMPT}\n\nuser: what is " in u for u in shown)


def test_streaming_path_one_sample_at_a_time_on_random_processes(
        verl_config: Any, workers, judge: JudgeProcess) -> None:
    workers(2)
    tokenizer = build_tokenizer()
    samples = rollouts(seed=2)
    tokenize(tokenizer, samples)
    cfg = LengthPenaltyConfig(penalty_scale=0.5, reward_coefficient=2.0, use_async_io=True)

    check(streaming_path(verl_config, samples, seed=7), samples, cfg)
    assert judge.stats()["requests_total"] == judged_pairs(samples)


@pytest.mark.parametrize("path", ["batch", "streaming"])
def test_group_judging_completes_every_group(
        verl_config: Any, workers, judge: JudgeProcess, path: str) -> None:
    """Group judging (listwise, groups of N) through verl's reward loop: each sample joins
    its uid's group as a member of its own (verl's per-sample ``priority``), so every group
    completes with one judge call and every sample is ok; the padding copies of verl's
    batch path count as their originals, and two rollouts of one group that wrote the same
    text are two members sharing one verdict."""
    workers(2)
    judge_in_groups(verl_config)
    tokenizer = build_tokenizer()
    samples = rollouts(seed=13)
    samples[1] = dict(samples[0])  # group 0: two members wrote the same text
    tokenize(tokenizer, samples)

    outputs = batch_path(verl_config, padded_batch(samples, tokenizer.pad_token_id)) \
        if path == "batch" else streaming_path(verl_config, samples, seed=5)

    infos = [o["reward_extra_info"] for o in outputs]
    assert [info["judge_status"] for info in infos] == ["ok"] * len(samples), infos
    assert infos[1]["judge_score"] == infos[0]["judge_score"]
    assert judge.stats()["requests_total"] == GROUPS  # one listwise call per group


def test_compute_score_as_verls_custom_reward_function_in_its_naive_manager(
        verl_config: Any, settings: Settings, workers, judge: JudgeProcess,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """verl's own ``naive`` manager with ``custom_reward_function=pkg://rewardq.verl``:
    the judge score only, settings from the reward-loop worker's environment."""
    import asyncio

    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    import rewardq.integrations.verl as adapter  # what pkg://rewardq.verl re-exports

    workers(1)
    monkeypatch.setenv("REWARDQ_REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("REWARDQ_JUDGE_BASE_URL", settings.judge_base_url)
    monkeypatch.setattr(adapter, "_shared", {})  # a fresh per-process client
    config = verl_config.copy()
    config.reward.reward_manager = {"source": "register", "name": "naive"}
    config.reward.custom_reward_function = {"path": "pkg://rewardq.verl",
                                            "name": "compute_score", "reward_kwargs": {}}
    tokenizer = build_tokenizer()
    samples = rollouts(seed=3)[:8]
    tokenize(tokenizer, samples)
    batch = [streamed_sample(s) for s in samples]
    for data, s in zip(batch, samples, strict=True):
        data.non_tensor_batch["extra_info"][0]["question"] = s["prompt_text"]
    no_question = streamed_sample(samples[0])

    async def run() -> list[dict[str, Any]]:
        worker = RewardLoopWorker(config)
        return list(await asyncio.gather(*(worker.compute_score(d)
                                           for d in [*batch, no_question])))

    *outputs, unanswerable = asyncio.run(run())
    for out, s in zip(outputs, samples, strict=True):
        want = normalize(expected_raw_score(s["prompt_text"], s["response_text"], s["truth"]))
        assert out["reward_extra_info"]["judge_status"] == "ok"
        assert abs(out["reward_score"] - want) < 1e-6
    assert unanswerable["reward_extra_info"]["judge_status"] == "invalid"
    assert judge.stats()["requests_total"] == len({(s["prompt_text"], s["response_text"])
                                                   for s in samples})


def test_a_streamed_validation_sample_does_not_wait_for_a_training_sized_group(
        verl_config: Any) -> None:
    """verl's stream carries no validation flag; the dataset's ``extra_info.split``
    marks it, and validation groups have ``val_kwargs.n`` (here 1) samples: no wait."""
    import asyncio

    from rewardq.producer.rewards import exact_final_answer as rule

    config = verl_config.copy()
    config.reward.reward_kwargs.rewardq.enable_openai_reward = False
    config.reward.reward_kwargs.rewardq.group_wait_s = 600  # a wait would hang the test
    manager, data, sample = streamed_validation_sample(config, rule)

    out = asyncio.run(asyncio.wait_for(manager.run_single(data), timeout=60))
    info = out["reward_extra_info"]
    assert (info["group_status"], info["group_size"], info["penalty"]) == ("single", 1, 0.0)
    assert info["judge_status"] == "disabled"
    assert out["reward_score"] == rule("arith", sample["response_text"], sample["truth"])


def test_group_judging_judges_a_validation_sample_alone(
        verl_config: Any, workers, judge: JudgeProcess) -> None:
    """Group judging on (groups of N in training): a validation sample (``val_kwargs.n``
    is 1) is judged alone, at once, instead of waiting for members that never come."""
    import asyncio

    from rewardq.producer.rewards import exact_final_answer as rule

    workers(1)
    judge_in_groups(verl_config)
    manager, data, _ = streamed_validation_sample(verl_config, rule)

    out = asyncio.run(asyncio.wait_for(manager.run_single(data), timeout=50))
    assert out["reward_extra_info"]["judge_status"] == "ok"
    assert judge.stats()["requests_total"] == 1
    assert "rewardq-group" not in judge.requests()[0]["user"]  # a plain call, no group


# --------------------------------------------------------------------------- identical rollouts


@pytest.mark.parametrize("use_async_io", [True, False], ids=["fleet", "in_process"])
def test_identical_rollouts_are_judged_once_on_the_batch_path(
        verl_config: Any, workers, judge: JudgeProcess, use_async_io: bool) -> None:
    """verl's batch path over two reward-loop processes: a 32-sample step holding two
    pairs of identical (prompt, response, ground truth) samples, inside their groups,
    makes one judge call per distinct triple, through the fleet and through each
    process's in-process judge alike."""
    if use_async_io:
        workers(2)
    verl_config.reward.reward_kwargs.rewardq.judge_when = "always"
    verl_config.reward.reward_kwargs.rewardq.use_async_io = use_async_io
    tokenizer = build_tokenizer()
    samples = rollouts(seed=11)
    for copy, original in ((1, 0), (21, 20)):  # group 0 and group 5, one per process
        samples[copy] = dict(samples[original])
    tokenize(tokenizer, samples)
    distinct = {(s["prompt_text"], s["response_text"], s["truth"]) for s in samples}
    assert len(distinct) == len(samples) - 2
    data = padded_batch(samples, tokenizer.pad_token_id)

    chunks = data.chunk(2)  # RewardLoopManager.compute_rm_score with reward.num_workers=2
    with harness(verl_config, 1) as first, harness(verl_config, 1) as second:
        futures = [first.submit(verl_harness.compute_score_batch, 0, chunks[0]),
                   second.submit(verl_harness.compute_score_batch, 0, chunks[1])]
        outputs = [o for f in futures for o in f.result(timeout=180)]

    stats = judge.stats()
    assert stats["requests_total"] == len(distinct) == 30, stats
    assert stats["max_requests_per_prompt"] == 1, stats
    infos = [o["reward_extra_info"] for o in outputs]
    assert [info["judge_status"] for info in infos] == ["ok"] * len(samples)
    for copy, original in ((1, 0), (21, 20)):
        assert outputs[copy]["reward_score"] == outputs[original]["reward_score"]
        assert infos[copy]["judge_score"] == infos[original]["judge_score"]


# ------------------------------------------------------------- rollouts as policies write them

#: The reasoning markers verl's tokenizer must carry for these rollouts (Qwen3's and R1's
#: ``<think>``/``</think>`` are added tokens kept by ``skip_special_tokens``; the
#: end-of-turn token is kept here too, as trainers that decode with it left in send it).
REASONING_TOKENS = ["<think>", "</think>", "<|im_end|>"]


def reasoning_rollouts() -> list[dict[str, Any]]:
    """One GRPO group of rollouts as policies write them, each with the outcome it must get:
    a short answer, an empty response (EOS at once), a 110k-character rollout with a long
    thinking block, one cut inside its thinking, one ending in ``<|im_end|>``, and a
    200k-character final answer."""
    thinking = "let me think step by step. first we add. " * 2700
    cases = [
        ("the answer is 5.", "ok"),
        ("", "no_answer"),
        (f"<think> {thinking}</think> first we add. so the answer is 5.", "ok"),
        ("<think> " + "hmm wait. so the result is it. " * 300, "no_answer"),
        ("then we compute the sum. the answer is 5. <|im_end|>", "ok"),
        ("we compute the sum of 2 and 3. " * 6500 + "so the final answer is 5.", "ok"),
    ]
    return [{"prompt": "what is 2 plus 3?", "response": response, "truth": "5",
             "uid": "uid-reasoning", "outcome": outcome} for response, outcome in cases]


@pytest.mark.parametrize("use_async_io", [True, False], ids=["fleet", "in_process"])
def test_rollouts_as_policies_write_them_complete_the_step(
        verl_config: Any, workers, judge: JudgeProcess, tmp_path: Path,
        use_async_io: bool) -> None:
    """verl's batch path over two reward-loop processes: every sample gets its outcome
    (``no_answer`` for the empty and the cut rollout, ``ok`` for the rest), the step
    completes, the judge never sees thinking or end-of-turn tokens, and the length
    penalty counts each full rollout's tokens."""
    if use_async_io:
        workers(2)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(REASONING_TOKENS)
    tokenizer.save_pretrained(tmp_path / "reasoning-tokenizer")
    verl_config.actor_rollout_ref.model.path = str(tmp_path / "reasoning-tokenizer")
    samples = reasoning_rollouts()
    verl_config.actor_rollout_ref.rollout.n = len(samples)
    verl_config.reward.reward_kwargs.rewardq.judge_when = "always"
    verl_config.reward.reward_kwargs.rewardq.use_async_io = use_async_io
    tokenize(tokenizer, samples)
    assert len(samples[2]["response_text"]) > 110_000
    assert len(samples[5]["response_text"]) > 200_000
    assert samples[4]["response_text"].endswith("<|im_end|>")
    data = padded_batch(samples, tokenizer.pad_token_id)

    chunks = data.chunk(2)
    with harness(verl_config, 1) as first, harness(verl_config, 1) as second:
        futures = [first.submit(verl_harness.compute_score_batch, 0, chunks[0]),
                   second.submit(verl_harness.compute_score_batch, 0, chunks[1])]
        outputs = [o for f in futures for o in f.result(timeout=180)]

    infos = [o["reward_extra_info"] for o in outputs]
    assert [info["judge_status"] for info in infos] == [s["outcome"] for s in samples]
    for s, out, info in zip(samples, outputs, infos, strict=True):
        assert info["length"] == len(s["response_ids"])  # the full rollout, thinking too
        assert math.isfinite(out["reward_score"])  # on_judge_failure=rule_only
        if s["outcome"] == "ok":
            assert 0.0 <= info["judge_score"] <= 1.0
        else:
            assert math.isnan(info["judge_score"])
            assert out["reward_score"] == pytest.approx(
                info["rule_score"] - 0.5 * info["penalty"])
    assert infos[2]["length"] > 25_000
    stats = judge.stats()
    assert stats["requests_total"] == 4, stats  # no call for the two without an answer
    assert stats["requests_with_thinking"] == 0, stats
    assert stats["requests_with_end_of_turn"] == 0, stats
    assert stats["max_response_chars"] < 40_000, stats  # the 200k answer, capped


def test_a_generation_prompt_that_opens_thinking_still_counts_with_raw_prompt(
        verl_config: Any, judge: JudgeProcess, tmp_path: Path) -> None:
    """R1-style templates end the prompt tokens with ``<think>``: the rollout starts inside
    it. The judge reads the question from ``raw_prompt`` (which has no generation prompt),
    and still a rollout cut inside that thinking has no final answer (``no_answer``, no
    call), while one that closes it is judged on what follows."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(REASONING_TOKENS)
    tokenizer.save_pretrained(tmp_path / "reasoning-tokenizer")
    verl_config.actor_rollout_ref.model.path = str(tmp_path / "reasoning-tokenizer")
    rewardq_options = verl_config.reward.reward_kwargs.rewardq
    rewardq_options.judge_when = "always"
    rewardq_options.use_async_io = False  # the in-process judge: no workers needed
    cases = [("let me think step by step. first we add. </think> so the answer is 5.", "ok"),
             ("hmm wait. so the result is it. " * 20, "no_answer")]
    verl_config.actor_rollout_ref.rollout.n = len(cases)
    samples = [{"prompt": "what is 2 plus 3? <think>", "response": response, "truth": "5",
                "uid": "uid-opened", "outcome": outcome,
                "messages": [{"role": "user", "content": "what is 2 plus 3?"}]}
               for response, outcome in cases]
    tokenize(tokenizer, samples)
    assert tokenizer.decode(samples[0]["prompt_ids"]).endswith("<think>")

    with harness(verl_config, 1) as only:
        outputs = only.submit(verl_harness.compute_score_batch, 0, padded_batch(
            samples, tokenizer.pad_token_id)).result(timeout=180)

    assert [o["reward_extra_info"]["judge_status"] for o in outputs] == ["ok", "no_answer"]
    assert judge.stats()["requests_total"] == 1
    [request] = judge.requests()
    assert "what is 2 plus 3?" in request["user"] and "<think>" not in request["user"]
    assert "so the answer is 5." in request["user"] and "first we add" not in request["user"]
