"""The TRL adapters inside a real ``GRPOTrainer`` / ``RLOOTrainer`` training step.

TRL's ``_calculate_rewards`` calls every reward function with ``prompts``,
``completions``, ``completion_ids``, the dataset's other columns, ``trainer_state``,
``log_extra`` and ``log_metric`` (the trainer's ``_log_metric``), runs coroutine
functions on its own event loop, turns ``None`` into NaN and names each function's
metrics after its ``__name__``. Driving one real step is the only way to see the status
counts land in ``trainer.state.log_history`` under the names a user reads.

Everything is built offline: the tokenizer from ``tokenizer_factory``, a randomly
initialised one-layer Llama from a config. Generation suppresses the special tokens, so
no completion decodes to an empty string; the ``invalid`` items come from a dataset row
whose reference answer is longer than a judge item may be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from tokenizer_factory import SPECIAL_TOKENS, build_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from rewardq.broker.schemas import MAX_TEXT_CHARS, ResultStatus
from rewardq.broker.settings import Settings
from rewardq.integrations.trl import (
    make_async_trl_reward,
    make_sync_trl_reward,
    make_trl_reward,
    metric_name,
)
from rewardq.judge_server.server import BackgroundJudgeServer

GENERATIONS = 2
#: One prompt judged normally, one whose reference no judge item may carry.
DATASET = {"prompt": ["what is 3 plus 4?", "what is 12 times 3?"],
           "solution": ["7", "9" * (MAX_TEXT_CHARS + 1)]}
PER_PROMPT = GENERATIONS  # completions of each prompt in the step's single reward call


def tiny_model(tokenizer: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def one_step(trainer_kind: str, reward_funcs: list[Any], output_dir: Path
             ) -> tuple[GRPOTrainer | RLOOTrainer, dict[str, Any]]:
    """Train one step (one generation batch: each prompt ``GENERATIONS`` times)."""
    tokenizer = build_tokenizer()
    options: dict[str, Any] = dict(
        output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=4,
        num_generations=GENERATIONS, max_completion_length=6, logging_steps=1,
        report_to="none", save_strategy="no", bf16=False, use_cpu=True, seed=0,
        beta=0.0,  # no reference model: RLOO would load one by name
        generation_kwargs={"suppress_tokens": tokenizer.convert_tokens_to_ids(
            list(SPECIAL_TOKENS))})
    trainer: GRPOTrainer | RLOOTrainer
    if trainer_kind == "grpo":
        trainer = GRPOTrainer(model=tiny_model(tokenizer), reward_funcs=reward_funcs,
                              args=GRPOConfig(**options), processing_class=tokenizer,
                              train_dataset=Dataset.from_dict(DATASET))
    else:
        trainer = RLOOTrainer(model=tiny_model(tokenizer), reward_funcs=reward_funcs,
                              args=RLOOConfig(**options), processing_class=tokenizer,
                              train_dataset=Dataset.from_dict(DATASET))
    trainer.train()
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_logs) == 1
    return trainer, step_logs[0]


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A rule reward beside the judge, as users combine them; it scores every row, so
    TRL does not warn about rows with no reward (and print the over-long reference)."""
    return [len(completion) / 100 for completion in completions]


def counts(log: dict[str, Any], function_name: str) -> dict[str, float]:
    return {status.value: log[metric_name(function_name, status)] for status in ResultStatus}


@pytest.mark.parametrize("trainer_kind", ["grpo", "rloo"])
def test_status_counts_reach_the_trainer_logs(
        trainer_kind: str, redis_url: str, local_judge: BackgroundJudgeServer,
        failing_judge: BackgroundJudgeServer, tmp_path: Path) -> None:
    """The three adapters under their default names, a named one and a rule reward.

    No worker consumes the fleet's queue, so both fleet functions time out (after 0.5 s,
    before the client would call the missing workers an error); the failing judge fails
    every item; the local judge scores every item. The over-long reference is
    ``invalid`` for all of them.
    """
    fleet = Settings(redis_url=redis_url, judge_base_url=local_judge.base_url)
    reward_funcs = [
        make_trl_reward(fleet, timeout_s=0.5),
        make_async_trl_reward(fleet, timeout_s=0.5),
        make_sync_trl_reward(Settings(judge_base_url=failing_judge.base_url)),
        make_sync_trl_reward(Settings(judge_base_url=local_judge.base_url), name="judge_ok"),
        length_reward,
    ]
    trainer, log = one_step(trainer_kind, reward_funcs, tmp_path)

    assert trainer.reward_func_names == ["rewardq_judge", "rewardq_judge_async",
                                         "rewardq_judge_sync", "judge_ok", "length_reward"]
    only_invalid = {"ok": 0.0, "failed": 0.0, "timeout": 0.0, "invalid": float(PER_PROMPT),
                    "budget_exceeded": 0.0, "no_answer": 0.0}
    assert counts(log, "rewardq_judge") == only_invalid | {"timeout": PER_PROMPT}
    assert counts(log, "rewardq_judge_async") == only_invalid | {"timeout": PER_PROMPT}
    assert counts(log, "rewardq_judge_sync") == only_invalid | {"failed": PER_PROMPT}
    assert counts(log, "judge_ok") == only_invalid | {"ok": PER_PROMPT}
    # None became NaN in TRL: no reward at all from the failing functions, one from judge_ok
    assert log["rewards/rewardq_judge_sync/mean"] is None
    assert log["rewards/rewardq_judge_async/mean"] is None
    assert 0.0 <= log["rewards/judge_ok/mean"] <= 1.0
    assert not any(key.startswith("rewardq/length_reward/") for key in log)
