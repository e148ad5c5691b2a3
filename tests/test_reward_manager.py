"""``LengthPenaltyRewardManager`` driven like verl drives it, in both judge modes.

The batch is a duck-typed ``DataProto`` built the way verl's rollout builds one: GRPO
groups (shared ``uid``), prompts left-padded, responses right-padded with an EOS token,
tokenized by a real ``transformers`` fast tokenizer built offline. The judge is the real
local judge over HTTP; every expected reward is computed independently of the manager:
the rule score from the sample's label, the judge score from
``rewardq.judge_server.grading.expected_raw_score`` on the decoded text, the penalty from the
plain-Python reference (``tests/penalty_reference.py``).

The sync mode runs against a judge in a thread of this process. The async mode needs the
fleet (Redis and worker processes, from ``tests/conftest.py``'s fixtures), and must give
exactly the sync mode's rewards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from rubric_texts import MATH_RUBRIC
from transformers import PreTrainedTokenizerFast

from rewardq.broker.schemas import ResultStatus, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.integrations.verl_batch import LengthPenaltyRewardManager
from rewardq.judge.verdicts import normalize
from rewardq.judge_server.grading import expected_raw_score
from rewardq.judge_server.server import BackgroundJudgeServer
from rewardq.producer.config import LengthPenaltyConfig
from rewardq.producer.rewards import combine_rewards, exact_final_answer
from rewardq.producer.sync_judge import SyncJudge

try:
    from tests import penalty_reference as ref
    from tests.tokenizer_factory import build_tokenizer, encode
except ImportError:  # pytest put tests/ itself, not the repository root, on sys.path
    import penalty_reference as ref  # type: ignore[no-redef]
    from tokenizer_factory import build_tokenizer, encode  # type: ignore[no-redef]

TOL = 1e-6


# --------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class Sample:
    """One rollout: its prompt, ground truth, response, GRPO group and whether it is right."""

    data_source: str
    prompt: str
    ground_truth: str | None
    response: str
    uid: str | None
    correct: bool
    eos: bool = True


def group(data_source: str, uid: str, prompt: str, truth: str,
          responses: Sequence[tuple[str, bool]]) -> list[Sample]:
    return [Sample(data_source, prompt, truth, text, uid, correct) for text, correct in responses]


SAMPLES: list[Sample] = [
    *group("gsm8k", "u-add", "what is 3 plus 4?", "7", [
        ("3 plus 4 = 7. the answer is 7.", True),
        ("let me think step by step. first 3 plus 4 is 7. so the answer is 7.", True),
        ("the answer is 8.", False),
        ("hmm. 3 plus 4 = 7. answer: 7", True),
    ]),
    *group("gsm8k", "u-mul", "what is 12 times 3?", "36", [
        ("12 times 3 = 36. the answer is 36.", True),
        ("12 times 3 is 35. so the answer is 35.", False),
        ("36", True),
        ("let me think. 12 times 3 = 12 plus 12 plus 12 = 36. we get 36. the answer is 36.",
         True),
        ("the answer is 46.", False),
    ]),
    *group("arith", "u-sub", "what is 10 minus 4?", "6", [
        ("10 minus 4 = 6. the answer is 6.", True),
        ("", False),
        ("the answer is 6", True),
    ]),
    Sample("arith", "what is 2 plus 2?", "4", "2 plus 2 = 4. the answer is 4", None, True,
           eos=False),
    Sample("arith", "compute 5 plus 5.", None, "5 plus 5 = 10. so we get 10.", None, False),
]


@dataclass
class Batch:
    """A duck-typed verl ``DataProto`` plus what the tests know about each row."""

    batch: dict[str, torch.Tensor]
    non_tensor_batch: dict[str, np.ndarray]
    meta_info: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    prompt_texts: list[str] = field(default_factory=list)
    response_texts: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.batch["responses"].shape[0])


def object_array(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def make_batch(tokenizer: PreTrainedTokenizerFast, samples: Sequence[Sample], *,
               with_uid: bool = True, with_reward_model: bool = True) -> Batch:
    """Tokenize ``samples`` into verl's layout: ``[left-padded prompt | right-padded response]``."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [encode(tokenizer, s.prompt) for s in samples]
    responses = [encode(tokenizer, s.response) + ([eos] if s.eos and s.response else [])
                 for s in samples]
    width_p = max(map(len, prompts)) + 2
    width_r = max(map(len, responses)) + 3
    prompt_rows = [[pad] * (width_p - len(p)) + p for p in prompts]
    response_rows = [r + [pad] * (width_r - len(r)) for r in responses]
    mask = [[0] * (width_p - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (width_r - len(r))
            for p, r in zip(prompts, responses, strict=True)]
    prompts_t = torch.tensor(prompt_rows)
    responses_t = torch.tensor(response_rows)
    tensors = {
        "prompts": prompts_t,
        "responses": responses_t,
        "input_ids": torch.cat([prompts_t, responses_t], dim=1),
        "attention_mask": torch.tensor(mask),
    }
    non_tensor: dict[str, np.ndarray] = {
        "data_source": object_array([s.data_source for s in samples]),
        "extra_info": object_array([{"index": i} for i in range(len(samples))]),
    }
    if with_reward_model:
        non_tensor["reward_model"] = object_array(
            [{"ground_truth": s.ground_truth, "style": "rule"} if s.ground_truth is not None
             else {"style": "model"} for s in samples])
    if with_uid:
        non_tensor["uid"] = object_array([s.uid for s in samples])
    return Batch(tensors, non_tensor, {"global_steps": 7}, list(samples),
                 [tokenizer.decode(p, skip_special_tokens=True) for p in prompts],
                 [tokenizer.decode(r, skip_special_tokens=True) for r in responses],
                 [len(r) for r in responses])


# --------------------------------------------------------------------------- expectations


def judge_score(batch: Batch, i: int) -> float:
    s = batch.samples[i]
    return normalize(expected_raw_score(batch.prompt_texts[i], batch.response_texts[i],
                                        s.ground_truth))


def expected_rewards(batch: Batch, cfg: LengthPenaltyConfig, *,
                     judge_fails: bool = False) -> list[float]:
    """Per sample: rule + coef * judge - scale * penalty; a sample the judge was asked
    about and failed gets ``on_judge_failure`` (``rule_only``: no judge term)."""
    uids = [s.uid for s in batch.samples] if "uid" in batch.non_tensor_batch else None
    penalties = ref.length_penalties(batch.lengths, uids, cfg)
    out = []
    for i, s in enumerate(batch.samples):
        rule = 1.0 if s.correct else 0.0
        asked = cfg.enable_openai_reward and (cfg.judge_when == "always" or rule > 0)
        no_answer = asked and not batch.response_texts[i]
        failed = asked and (judge_fails or no_answer)
        judge = judge_score(batch, i) if asked and not failed else 0.0
        reward = rule + cfg.reward_coefficient * judge - cfg.penalty_scale * penalties[i]
        if failed and cfg.on_judge_failure == "zero":
            reward = 0.0
        elif failed and cfg.on_judge_failure == "nan":
            reward = math.nan
        out.append(reward)
    return out


def rewards_at_last_token(batch: Batch, tensor: torch.Tensor) -> list[float]:
    """The reward of each row, checking that it sits alone at the last valid token."""
    assert tensor.dtype == torch.float32
    assert tensor.shape == batch.batch["responses"].shape
    out = []
    for i, length in enumerate(batch.lengths):
        at = max(length - 1, 0)
        row = tensor[i].clone()
        out.append(float(row[at]))
        row[at] = 0.0
        assert not row.any(), f"row {i}: non-zero reward away from token {at}"
    return out


def assert_rewards(actual: Sequence[float], expected: Sequence[float]) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if math.isnan(e):
            assert math.isnan(a), f"sample {i}: {a} is not NaN"
        else:
            assert a == pytest.approx(e, abs=TOL), f"sample {i}: {a} != {e}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def judge_settings(server: BackgroundJudgeServer) -> Settings:
    return Settings(judge_base_url=server.base_url)


def requests_total(server: BackgroundJudgeServer) -> int:
    root = server.base_url.removesuffix("/v1")
    total: int = httpx.get(f"{root}/stats", timeout=5).json()["requests_total"]
    return total


@pytest.fixture
def sync_manager(tokenizer: PreTrainedTokenizerFast, local_judge: BackgroundJudgeServer
                 ) -> Iterator[Callable[..., LengthPenaltyRewardManager]]:
    """Builds sync-mode managers against the local judge; closes them afterwards."""
    built: list[LengthPenaltyRewardManager] = []

    def build(num_examine: int = 0, settings: Settings | None = None,
              **config: Any) -> LengthPenaltyRewardManager:
        manager = LengthPenaltyRewardManager(
            tokenizer, num_examine, length_penalty_config=config,
            settings=settings or judge_settings(local_judge))
        built.append(manager)
        return manager

    yield build
    for manager in built:
        manager.close()


# --------------------------------------------------------------------------- sync mode

CONFIG = {"reward_coefficient": 0.5, "penalty_scale": 2.0, "peak_ratio": 0.2,
          "outer_ratio": 0.6, "max_penalty": 0.75}


@pytest.mark.parametrize("judge_when", ["always", "correct_only"])
def test_sync_rewards_match_the_formula(tokenizer: PreTrainedTokenizerFast, sync_manager: Any,
                                        local_judge: BackgroundJudgeServer,
                                        judge_when: str) -> None:
    batch = make_batch(tokenizer, SAMPLES)
    manager = sync_manager(judge_when=judge_when, **CONFIG)
    before = requests_total(local_judge)
    out = manager(batch, return_dict=True)
    asked = [i for i, s in enumerate(SAMPLES) if judge_when == "always" or s.correct]
    # An empty response has no answer to judge: no_answer, without a judge call.
    sent = [i for i in asked if batch.response_texts[i]]
    assert requests_total(local_judge) - before == len(sent)
    assert_rewards(rewards_at_last_token(batch, out["reward_tensor"]),
                   expected_rewards(batch, manager.config))
    statuses = out["reward_extra_info"]["judge_status"]
    assert statuses == ["ok" if i in sent else "no_answer" if i in asked else "skipped"
                        for i in range(len(SAMPLES))]
    assert manager.last_timing is not None
    assert (manager.last_timing.mode, manager.last_timing.judged) == ("sync", len(asked))


def test_reward_extra_info_is_in_batch_order(tokenizer: PreTrainedTokenizerFast,
                                             sync_manager: Any) -> None:
    batch = make_batch(tokenizer, SAMPLES)
    manager = sync_manager(**CONFIG)
    out = manager(batch, return_dict=True)
    info = out["reward_extra_info"]
    n = len(SAMPLES)
    assert set(info) == {"rule_score", "judge_score", "judge_status", "length", "group_median",
                         "penalty", "reward"}
    assert all(len(values) == n for values in info.values())
    uids = [s.uid for s in SAMPLES]
    cfg = manager.config
    assert info["rule_score"] == [1.0 if s.correct else 0.0 for s in SAMPLES]
    assert info["length"] == batch.lengths
    assert info["group_median"] == ref.group_medians(batch.lengths, uids)
    assert info["penalty"] == pytest.approx(ref.length_penalties(batch.lengths, uids, cfg),
                                            abs=TOL)
    for i, s in enumerate(SAMPLES):
        if s.correct and batch.response_texts[i]:
            assert info["judge_score"][i] == judge_score(batch, i)
        else:
            assert math.isnan(info["judge_score"][i])
    assert_rewards(info["reward"], rewards_at_last_token(batch, out["reward_tensor"]))
    # Without return_dict: the same tensor alone.
    assert torch.equal(manager(batch), out["reward_tensor"])


@pytest.mark.parametrize("policy", ["rule_only", "zero", "nan"])
def test_judge_failure_is_never_a_silent_zero(tokenizer: PreTrainedTokenizerFast,
                                              sync_manager: Any,
                                              failing_judge: BackgroundJudgeServer,
                                              policy: str) -> None:
    batch = make_batch(tokenizer, SAMPLES)
    manager = sync_manager(settings=judge_settings(failing_judge), on_judge_failure=policy,
                           **CONFIG)
    out = manager(batch, return_dict=True)
    assert_rewards(rewards_at_last_token(batch, out["reward_tensor"]),
                   expected_rewards(batch, manager.config, judge_fails=True))
    info = out["reward_extra_info"]
    correct = [i for i, s in enumerate(SAMPLES) if s.correct]
    assert {info["judge_status"][i] for i in correct} == {"failed"}
    assert all(math.isnan(info["judge_score"][i]) for i in correct)
    assert {info["judge_status"][i] for i, s in enumerate(SAMPLES) if not s.correct} == {
        "skipped"}


def test_unreachable_judge_fails_items_not_the_call(tokenizer: PreTrainedTokenizerFast
                                                    ) -> None:
    from rewardq.broker.embedded import free_port

    settings = Settings(judge_base_url=f"http://127.0.0.1:{free_port()}/v1")
    samples = [s for s in SAMPLES if s.uid == "u-add"]
    batch = make_batch(tokenizer, samples)
    with SyncJudge(settings, max_retries=0, timeout_s=5) as judge:
        manager = LengthPenaltyRewardManager(tokenizer, 0, settings=settings, sync_judge=judge)
        out = manager(batch, return_dict=True)
    info = out["reward_extra_info"]
    assert info["judge_status"] == ["failed" if s.correct else "skipped" for s in samples]
    assert_rewards(info["reward"], expected_rewards(batch, manager.config, judge_fails=True))


def test_judge_disabled_makes_no_call(tokenizer: PreTrainedTokenizerFast, sync_manager: Any,
                                      local_judge: BackgroundJudgeServer) -> None:
    batch = make_batch(tokenizer, SAMPLES)
    manager = sync_manager(enable_openai_reward=False, judge_when="always", **CONFIG)
    before = requests_total(local_judge)
    out = manager(batch, return_dict=True)
    assert requests_total(local_judge) == before
    assert out["reward_extra_info"]["judge_status"] == ["disabled"] * len(SAMPLES)
    assert_rewards(rewards_at_last_token(batch, out["reward_tensor"]),
                   expected_rewards(batch, manager.config))
    assert manager.last_timing is not None and manager.last_timing.mode == "off"


@pytest.mark.parametrize("num_examine", [0, 1, 2])
def test_num_examine_prints_n_examples_per_data_source(
        tokenizer: PreTrainedTokenizerFast, sync_manager: Any, num_examine: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    batch = make_batch(tokenizer, SAMPLES)
    manager = sync_manager(num_examine=num_examine)
    capsys.readouterr()
    manager(batch)
    printed = capsys.readouterr().out
    for source in {s.data_source for s in SAMPLES}:
        assert printed.count(f"[data_source] {source}\n") == num_examine
    assert printed.count("[prompt] ") == 2 * num_examine
    # The first example of a source is its first row, decoded without special tokens.
    if num_examine:
        assert f"[response] {batch.response_texts[0]}\n" in printed
        assert "[EOS]" not in printed and "[PAD]" not in printed
    else:
        assert printed == ""


def test_config_as_dict_and_as_object_agree(tokenizer: PreTrainedTokenizerFast,
                                            local_judge: BackgroundJudgeServer) -> None:
    batch = make_batch(tokenizer, SAMPLES)
    settings = judge_settings(local_judge)
    as_dict = LengthPenaltyRewardManager(tokenizer, 0, length_penalty_config=dict(CONFIG),
                                         settings=settings)
    as_object = LengthPenaltyRewardManager(tokenizer, 0, settings=settings,
                                           length_penalty_config=LengthPenaltyConfig(**CONFIG))
    try:
        assert as_dict.config == as_object.config
        assert torch.equal(as_dict(batch), as_object(batch))  # type: ignore[arg-type]
    finally:
        as_dict.close()
        as_object.close()


def test_bad_config_and_kwargs_fail_at_construction(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="outer_ratio"):
        LengthPenaltyRewardManager(tokenizer, 0,
                                   length_penalty_config={"peak_ratio": 0.5, "outer_ratio": 0.4})
    with pytest.raises(ValueError, match="penalty_scal"):
        LengthPenaltyRewardManager(tokenizer, 0, length_penalty_config={"penalty_scal": 2})
    with pytest.raises(TypeError, match="settngs"):
        LengthPenaltyRewardManager(tokenizer, 0, settngs=Settings())


def test_custom_compute_score_and_missing_columns(tokenizer: PreTrainedTokenizerFast,
                                                  local_judge: BackgroundJudgeServer) -> None:
    """A dict-returning ``compute_score`` adds its keys; no uid = no groups = no penalty;
    no reward_model = no ground truth."""
    seen: list[tuple[str, str, Any, Any]] = []

    def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                      extra_info: Any = None) -> dict[str, Any]:
        seen.append((data_source, solution_str, ground_truth, extra_info))
        return {"score": 0.25 if "answer" in solution_str else 0.0, "acc": len(solution_str)}

    batch = make_batch(tokenizer, SAMPLES, with_uid=False, with_reward_model=False)
    manager = LengthPenaltyRewardManager(tokenizer, 0, compute_score=compute_score,
                                         length_penalty_config=CONFIG,
                                         settings=judge_settings(local_judge))
    try:
        out = manager(batch, return_dict=True)
    finally:
        manager.close()
    info = out["reward_extra_info"]
    assert seen == [(s.data_source, text, None, {"index": i})
                    for i, (s, text) in enumerate(zip(SAMPLES, batch.response_texts,
                                                      strict=True))]
    assert info["acc"] == [len(text) for text in batch.response_texts]
    assert info["penalty"] == [0.0] * len(SAMPLES)
    assert info["group_median"] == [float(n) for n in batch.lengths]
    rules = [0.25 if "answer" in text else 0.0 for text in batch.response_texts]
    assert info["rule_score"] == rules
    # No reference: judged with the quality rubric.
    expected = [rule + 0.5 * (normalize(expected_raw_score(p, r, None)) if rule > 0 else 0.0)
                for rule, p, r in zip(rules, batch.prompt_texts, batch.response_texts,
                                      strict=True)]
    assert_rewards(rewards_at_last_token(batch, out["reward_tensor"]), expected)


def test_default_rule_score() -> None:
    assert exact_final_answer("x", "so the answer is 1,000.50.", "1000.5") == 1.0
    assert exact_final_answer("x", "we get \\boxed{42}", "#### 42") == 1.0
    assert exact_final_answer("x", "3 plus 4 is 8, no: 7", "8") == 0.0
    assert exact_final_answer("x", "the answer : 7", "7") == 1.0
    assert exact_final_answer("x", "no number here", "7") == 0.0
    assert exact_final_answer("x", "7", None) == 0.0


# --------------------------------------------------------------------------- async mode


def test_async_mode_gives_the_sync_rewards(tokenizer: PreTrainedTokenizerFast,
                                           settings: Settings, workers: Any) -> None:
    """Through Redis and worker processes, exactly the in-process loop's rewards."""
    workers(n=2)
    batch = make_batch(tokenizer, SAMPLES)
    config = {**CONFIG, "judge_when": "always", "score_timeout_s": 60.0}
    sync = LengthPenaltyRewardManager(tokenizer, 0, settings=settings,
                                      length_penalty_config=config)
    fleet = LengthPenaltyRewardManager(tokenizer, 0, settings=settings,
                                       length_penalty_config={**config, "use_async_io": True})
    try:
        expected = sync(batch, return_dict=True)
        got = fleet(batch, return_dict=True)
        again = fleet(batch, return_dict=True)  # now from the fleet's cache
    finally:
        sync.close()
        fleet.close()
    assert got["reward_extra_info"] == expected["reward_extra_info"]
    assert torch.equal(got["reward_tensor"], expected["reward_tensor"])
    assert torch.equal(again["reward_tensor"], expected["reward_tensor"])
    for key in ("judge_status", "length", "group_median", "penalty", "rule_score"):
        assert got["reward_extra_info"][key] == expected["reward_extra_info"][key], key
    assert_rewards(rewards_at_last_token(batch, got["reward_tensor"]),
                   expected_rewards(batch, LengthPenaltyConfig.from_mapping(config)))
    assert fleet.last_timing is not None
    assert fleet.last_timing.mode == "async"
    assert fleet.last_timing.judged == len(SAMPLES)  # the empty response too: no_answer


def test_async_mode_judge_failure_policy(tokenizer: PreTrainedTokenizerFast, settings: Settings,
                                         workers: Any, judge: Any) -> None:
    """Items the fleet cannot judge come back failed (never 0) and the policy applies."""
    workers(n=1)
    samples = [replace(s, response=s.response + " so.") for s in SAMPLES if s.uid == "u-mul"]
    batch = make_batch(tokenizer, samples)  # fresh responses: not in the fleet's cache
    judge.configure(error_rate=1.0, error_kinds=["400"])
    manager = LengthPenaltyRewardManager(
        tokenizer, 0, settings=settings,
        length_penalty_config={**CONFIG, "use_async_io": True, "on_judge_failure": "zero",
                               "score_timeout_s": 60.0})
    try:
        out = manager(batch, return_dict=True)
    finally:
        manager.close()
    info = out["reward_extra_info"]
    assert info["judge_status"] == [ResultStatus.FAILED.value if s.correct else "skipped"
                                    for s in samples]
    assert_rewards(rewards_at_last_token(batch, out["reward_tensor"]),
                   expected_rewards(batch, manager.config, judge_fails=True))


# --------------------------------------------------------------------------- items that fail alone

MATH_BOOK = 'default = "math"\n\n' + MATH_RUBRIC


@pytest.mark.parametrize("use_async_io", [False, True], ids=["sync", "fleet"])
def test_a_sample_its_rubric_refuses_fails_alone(
        tokenizer: PreTrainedTokenizerFast, settings: Settings, workers: Any, judge: Any,
        tmp_path: Path, use_async_io: bool) -> None:
    """A rubric that needs a reference, and one sample without one: the producer refuses
    that item (``RewardClient.submit`` and ``SyncJudge.score`` refuse a whole list for
    one such item); the manager fails it alone as ``invalid`` and scores the rest, each
    identical pair with one judge call."""
    path = tmp_path / "rubrics.toml"
    path.write_text(MATH_BOOK, encoding="utf-8")
    run = settings.model_copy(update={"rubrics_file": path})
    if use_async_io:
        workers(1, rubrics_file=path)
    samples = [s for s in SAMPLES if s.response and s.ground_truth is not None][:4]
    samples += [replace(samples[0], uid="u-copy"),  # identical text: one call for both
                replace(samples[1], ground_truth=None)]  # no reference for the math rubric
    batch = make_batch(tokenizer, samples)
    manager = LengthPenaltyRewardManager(
        tokenizer, 0, settings=run, length_penalty_config={
            "judge_when": "always", "use_async_io": use_async_io, "score_timeout_s": 60.0,
            "on_judge_failure": "zero"})
    try:
        out = manager(batch, return_dict=True)
    finally:
        manager.close()
    info = out["reward_extra_info"]
    assert info["judge_status"] == ["ok"] * 5 + ["invalid"]
    assert info["reward"][5] == 0.0 and math.isnan(info["judge_score"][5])
    assert info["judge_score"][4] == info["judge_score"][0]
    assert judge.stats()["requests_total"] == 4


def test_every_status_but_ok_gets_on_judge_failure() -> None:
    """``no_answer`` and ``budget_exceeded`` are failures like ``failed``, ``timeout``
    and ``invalid``: the judge term is dropped, or the reward is 0 or NaN."""
    statuses = [s for s in ResultStatus if s is not ResultStatus.OK]
    judged: list[ScoreResult | None] = [ScoreResult.failure(str(i), s, "why")
                                        for i, s in enumerate(statuses)]
    judged += [ScoreResult(id="ok", status=ResultStatus.OK, score=0.5, raw_score=5.0), None]
    n = len(judged)
    rule, penalty = torch.ones(n, dtype=torch.float64), torch.full((n,), 0.25)
    for policy, failed in (("rule_only", 0.75), ("zero", 0.0), ("nan", math.nan)):
        cfg = LengthPenaltyConfig(on_judge_failure=policy, reward_coefficient=2.0)
        reward = combine_rewards(rule, judged, penalty, cfg).tolist()
        assert reward[-2:] == [1.75, 0.75], policy  # ok: 1 + 2 * 0.5 - 0.25; not judged
        for status, value in zip(statuses, reward, strict=False):
            assert value == failed or (math.isnan(failed) and math.isnan(value)), status
