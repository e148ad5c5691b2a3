"""verl <= 0.6: ``LengthPenaltyRewardManager``, rewardq as a verl batch reward manager.

verl builds it as ``cls(tokenizer=..., num_examine=..., compute_score=...,
reward_fn_key=..., **reward_kwargs)`` and calls it with a ``DataProto`` once per step.
For every sample the reward is :mod:`rewardq.producer.rewards`'::

    rule_score + reward_coefficient * judge_score - penalty_scale * penalty

placed on the last valid response token of a float32 tensor shaped like ``responses``.

One call, in the order that lets the judge overlap the trainer's own work:

1. decode prompts and valid responses, compute the rule scores (``compute_score``);
2. pick the judge items (rule score > 0 unless ``judge_when="always"``) and, in the
   async mode, submit them to the worker fleet through ``RewardClient``;
3. compute response lengths, group medians and the length penalty on the batch's device
   while the fleet judges;
4. wait for the judge scores (async: ``PendingScores.result(partial=True)``; sync: the
   in-process ``SyncJudge`` loop runs here), combine, place at the last token.

A judge failure is never a silent 0: the sample's ``judge_status`` says what happened and
``on_judge_failure`` says what its reward becomes. A sample that is no valid item (an
empty prompt, an unknown rubric) or has no final answer to show the judge (an empty
rollout, thinking cut at the length limit: ``no_answer``) fails alone with its status;
the step goes on. ``last_timing`` records the step's "GPU wait" (time blocked on judge
scores) next to the judge's wall time.

Identical samples are judged once on both paths: the fleet dedups by the items'
fingerprints (``rewardq.broker.keys``), and the in-process sync judge goes through
:func:`rewardq.integrations.judging.score_each_once`, which asks it once per distinct
fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rewardq.extras import require

require("rewardq.integrations.verl_batch", "trainer")  # before torch: a one-line error without it

import torch
from pydantic import ValidationError
from torch import Tensor

from rewardq.broker.errors import ConfigError
from rewardq.broker.schemas import ResultStatus, ScoreItem, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.integrations.judging import score_each_once, without_invalid
from rewardq.producer.client import PendingScores, RewardClient
from rewardq.producer.config import LengthPenaltyConfig
from rewardq.producer.penalties import (
    group_ids,
    group_medians,
    length_penalty,
    place_at_last_token,
    response_lengths,
)
from rewardq.producer.rewards import (
    combine_rewards,
    exact_final_answer,
    judge_score,
    judge_status,
)
from rewardq.producer.step_timing import JudgeMode, StepTiming, now, synchronize
from rewardq.producer.sync_judge import SyncJudge

__all__ = ["DataProtoLike", "LengthPenaltyRewardManager"]

ComputeScore = Callable[..., "float | Mapping[str, Any]"]
RewardOutput = Tensor | dict[str, Any]


class DataProtoLike(Protocol):
    """What the manager reads from verl's ``DataProto``."""

    @property
    def batch(self) -> Any:
        """Tensors by name: ``prompts``, ``responses``, ``attention_mask``."""

    @property
    def non_tensor_batch(self) -> Mapping[str, Any]:
        """Per-sample numpy object arrays: ``data_source``, ``reward_model``, ``uid``, ..."""

    def __len__(self) -> int: ...


# --------------------------------------------------------------------------- the manager


@dataclass(frozen=True)
class _Samples:
    """The batch's per-sample text and metadata, decoded once."""

    prompts: list[str]
    responses: list[str]
    data_sources: list[str]
    ground_truths: list[Any]
    extra_infos: list[Any]
    uids: list[Any] | None


class LengthPenaltyRewardManager:
    """A verl reward manager: rule score, LLM-judge score and the length penalty.

    Args:
        tokenizer: the policy's tokenizer (anything with ``batch_decode``).
        num_examine: decoded examples to print per data source on each call.
        compute_score: ``f(data_source=, solution_str=, ground_truth=, extra_info=)``
            returning a float or a dict with ``"score"`` (its other keys are added to
            ``reward_extra_info``); default :func:`exact_final_answer`.
        reward_fn_key: the ``non_tensor_batch`` key that holds the data source.
        length_penalty_config: a ``LengthPenaltyConfig``, a dict or an OmegaConf
            mapping (``LengthPenaltyConfig.from_mapping``); ``None`` = the defaults.
        **kwargs: ``settings`` (``rewardq.broker.settings.Settings``; default ``Settings()``
            from ``REWARDQ_*`` on first use, since verl makes this class the entry point),
            ``client`` (a ``RewardClient`` for the async mode; default one built on first
            use from the settings), ``sync_judge`` (a ``SyncJudge`` for the sync mode).
            The config's ``model_name`` and ``judge_base_url``, when set, override the
            settings' judge model and URL.

    Raises:
        pydantic.ValidationError: the config is invalid.
        ConfigError: ``model_name`` differs from the injected client's judge model.
        TypeError: an unknown keyword argument (a typo would otherwise go unnoticed).
    """

    def __init__(self, tokenizer: Any, num_examine: int,
                 compute_score: ComputeScore | None = None, reward_fn_key: str = "data_source",
                 length_penalty_config: LengthPenaltyConfig | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        settings: Settings | None = kwargs.pop("settings", None)
        client: RewardClient | None = kwargs.pop("client", None)
        sync_judge: SyncJudge | None = kwargs.pop("sync_judge", None)
        if kwargs:
            raise TypeError(f"LengthPenaltyRewardManager got unknown keyword arguments "
                            f"{sorted(kwargs)}; known: settings, client, sync_judge")
        self.tokenizer = tokenizer
        self.num_examine = num_examine
        self.compute_score: ComputeScore = compute_score or exact_final_answer
        self.reward_fn_key = reward_fn_key
        self.config = _as_config(length_penalty_config)
        cfg = self.config
        if client is not None and cfg.model_name and client.spec.model != cfg.model_name:
            raise ConfigError(f"length_penalty_config.model_name={cfg.model_name!r} but the "
                              f"injected client judges with {client.spec.model!r}")
        self._settings = settings if settings is not None else (
            client.settings if client is not None else None)
        self._resolved: Settings | None = None
        self._client = client
        self._sync_judge = sync_judge
        self._owned: list[RewardClient | SyncJudge] = []
        self._calls = 0
        #: Timings of the latest call (``None`` before the first).
        self.last_timing: StepTiming | None = None

    # ------------------------------------------------------------------ judges

    @property
    def settings(self) -> Settings:
        """The settings in use: the injected ones or ``Settings()``, with the config's
        ``model_name``/``judge_base_url`` applied."""
        if self._resolved is None:
            base = self._settings if self._settings is not None else Settings()
            updates: dict[str, Any] = {}
            if self.config.model_name:
                updates["judge_model"] = self.config.model_name
            if self.config.judge_base_url:
                updates["judge_base_url"] = self.config.judge_base_url.rstrip("/")
            self._resolved = base.model_copy(update=updates) if updates else base
        return self._resolved

    @property
    def client(self) -> RewardClient:
        """The async mode's ``RewardClient`` (built on first use)."""
        if self._client is None:
            self._client = RewardClient(self.settings)
            self._owned.append(self._client)
        return self._client

    @property
    def sync_judge(self) -> SyncJudge:
        """The sync mode's ``SyncJudge`` (built on first use)."""
        if self._sync_judge is None:
            cfg = self.config
            self._sync_judge = SyncJudge(self.settings, api_key=cfg.api_key,
                                         timeout_s=cfg.judge_timeout_s)
            self._owned.append(self._sync_judge)
        return self._sync_judge

    def close(self) -> None:
        """Close the client or judge this manager built (injected ones are the caller's)."""
        for owned in self._owned:
            owned.close()
        self._owned.clear()

    # ------------------------------------------------------------------ the call

    def __call__(self, data: DataProtoLike, return_dict: bool = False) -> RewardOutput:
        """Score one step's batch.

        Args:
            data: verl's ``DataProto`` (or anything with its ``batch`` tensors
                ``prompts``/``responses``/``attention_mask`` and its ``non_tensor_batch``
                arrays ``<reward_fn_key>``/``reward_model``/``extra_info``/``uid``, each
                optional: no ``uid`` means no groups, hence no group-median penalty).
            return_dict: also return ``reward_extra_info``.

        Returns:
            The float32 reward tensor shaped like ``responses``, or with ``return_dict``
            ``{"reward_tensor": ..., "reward_extra_info": {"rule_score", "judge_score"
            (NaN when not ok), "judge_status" (a ``ResultStatus`` value: "ok",
            "failed", "timeout", "invalid", "budget_exceeded", "no_answer"; or
            "skipped", "disabled"), "length" (the full rollout's tokens), "group_median",
            "penalty", "reward": lists in batch order}}``. Every status but "ok" gets
            ``on_judge_failure``.

        Raises:
            BrokerUnavailableError: async mode, and Redis could not be reached.
            KeyError: ``data.batch`` lacks one of the three tensors.
        """
        started = now()
        cfg = self.config
        self._calls += 1
        prompts: Tensor = data.batch["prompts"]
        responses: Tensor = data.batch["responses"]
        mask: Tensor = data.batch["attention_mask"]
        prompt_len = prompts.shape[-1]
        samples = self._decode(data, prompts, responses, mask)
        rule_scores, rule_extras = self._rule_scores(samples)

        to_judge = self._judge_indices(rule_scores)
        judged: list[ScoreResult | None] = [None] * len(samples.prompts)
        items = self._items(samples, to_judge, judged)
        if items and cfg.use_async_io:
            items = without_invalid(self.client.rubrics, items, judged)
        mode: JudgeMode = "off" if not items else ("async" if cfg.use_async_io else "sync")

        submit_s = 0.0
        pending: PendingScores | None = None
        judge_started = now()
        if mode == "async":
            pending = self.client.submit(items, step=_global_step(data, default=self._calls))
            submit_s = now() - judge_started

        penalty_started = now()
        lengths = response_lengths(mask, prompt_len)
        # verl's uid column, a numpy object array, goes to group_ids as it is: grouping it
        # costs ~1.5 ms for 131,072 samples, where a list of them costs 1 ms more to copy.
        uid_column = data.non_tensor_batch.get("uid") if samples.uids is not None else None
        uids = uid_column if getattr(uid_column, "ndim", None) == 1 else samples.uids
        groups = (group_ids(uids, device=lengths.device) if uids is not None
                  else torch.arange(lengths.numel(), device=lengths.device))
        medians = group_medians(lengths, groups)
        penalty = length_penalty(lengths, groups, cfg)
        synchronize(lengths.device)
        penalty_s = now() - penalty_started

        wait_started = now()
        if pending is not None:
            results = pending.result(timeout=cfg.score_timeout_s, partial=True)
        elif mode == "sync":
            results = score_each_once(self.sync_judge, items)
        else:
            results = []
        wait_ended = now()
        wait_s = wait_ended - wait_started
        for result in results:
            judged[int(result.id)] = result
        judge_wall_s = wait_s  # sync: the judge loop ran inside the wait
        if pending is not None:
            # Async: from the submit's start to the last chunk's result (as the backend
            # stamped it), or to the end of the wait when that is unknown.
            finished = pending.finished_at_perf()
            last = wait_ended if finished is None else min(max(finished, judge_started),
                                                            wait_ended)
            judge_wall_s = last - judge_started

        rule_t = torch.tensor(rule_scores, dtype=torch.float64)
        reward = combine_rewards(rule_t, judged, penalty, cfg)
        reward_tensor = place_at_last_token(reward, lengths, tuple(responses.shape))
        statuses = self._statuses(judged)
        self._examine(samples, rule_scores, judged, statuses, lengths, penalty, reward)
        self.last_timing = StepTiming(
            mode=mode, items=len(samples.prompts), judged=len(items), submit_s=submit_s,
            penalty_s=penalty_s, gpu_wait_s=wait_s if mode != "off" else 0.0,
            judge_wall_s=judge_wall_s if mode != "off" else 0.0, total_s=now() - started)
        if not return_dict:
            return reward_tensor
        extra: dict[str, list[Any]] = {
            "rule_score": rule_scores,
            "judge_score": [judge_score(r) for r in judged],
            "judge_status": statuses,
            "length": lengths.tolist(),
            "group_median": medians.tolist(),
            "penalty": penalty.tolist(),
            "reward": reward.tolist(),
        }
        for key, values in rule_extras.items():
            extra.setdefault(key, values)
        return {"reward_tensor": reward_tensor, "reward_extra_info": extra}

    # ------------------------------------------------------------------ steps of a call

    def _decode(self, data: DataProtoLike, prompts: Tensor, responses: Tensor, mask: Tensor
                ) -> _Samples:
        """Prompts (valid left-padded part) and responses (valid part) as text, plus the
        per-sample metadata, missing columns tolerated."""
        batch_size = prompts.shape[0]
        prompt_len = prompts.shape[-1]
        mask_cpu = mask.detach().cpu()
        prompt_valid = mask_cpu[:, :prompt_len].sum(-1).tolist()
        response_valid = mask_cpu[:, prompt_len:].sum(-1).tolist()
        prompt_rows = prompts.detach().cpu().tolist()
        response_rows = responses.detach().cpu().tolist()
        prompt_ids = [row[prompt_len - int(n):] for row, n in zip(prompt_rows, prompt_valid,
                                                                   strict=True)]
        response_ids = [row[:int(n)] for row, n in zip(response_rows, response_valid,
                                                        strict=True)]
        decode = self.tokenizer.batch_decode
        non_tensor = data.non_tensor_batch
        reward_model = _column(non_tensor, "reward_model", batch_size)
        uids = _column(non_tensor, "uid", batch_size) if "uid" in non_tensor else None
        return _Samples(
            prompts=list(decode(prompt_ids, skip_special_tokens=True)),
            responses=list(decode(response_ids, skip_special_tokens=True)),
            data_sources=[str(ds) if ds is not None else "unknown"
                          for ds in _column(non_tensor, self.reward_fn_key, batch_size)],
            ground_truths=[rm.get("ground_truth") if isinstance(rm, Mapping) else None
                           for rm in reward_model],
            extra_infos=_column(non_tensor, "extra_info", batch_size),
            uids=[_plain(uid) for uid in uids] if uids is not None else None,
        )

    def _rule_scores(self, samples: _Samples) -> tuple[list[float], dict[str, list[Any]]]:
        """``compute_score`` of every sample, and the other keys of dict answers."""
        scores: list[float] = []
        extras: dict[str, list[Any]] = {}
        for i, (source, response, truth, info) in enumerate(zip(
                samples.data_sources, samples.responses, samples.ground_truths,
                samples.extra_infos, strict=True)):
            answer = self.compute_score(data_source=source, solution_str=response,
                                        ground_truth=truth, extra_info=info)
            if isinstance(answer, Mapping):
                for key, value in answer.items():
                    if key != "score":
                        extras.setdefault(key, [None] * len(samples.responses))[i] = value
                answer = answer["score"]
            scores.append(float(answer))
        return scores, extras

    def _judge_indices(self, rule_scores: Sequence[float]) -> list[int]:
        cfg = self.config
        if not cfg.enable_openai_reward:
            return []
        if cfg.judge_when == "always":
            return list(range(len(rule_scores)))
        return [i for i, score in enumerate(rule_scores) if score > 0]

    @staticmethod
    def _items(samples: _Samples, indices: Sequence[int],
               judged: list[ScoreResult | None]) -> list[ScoreItem]:
        """Judge items for ``indices`` (id = batch index); a sample that is no valid item
        (an empty prompt, a text over ``rewardq.broker.schemas.MAX_TEXT_CHARS``) gets an
        ``invalid`` result in ``judged``. Empty and long responses are items: the judge
        is shown their view, and one with no final answer gets ``no_answer``."""
        items: list[ScoreItem] = []
        for i in indices:
            truth = samples.ground_truths[i]
            uid = samples.uids[i] if samples.uids is not None else None
            try:
                items.append(ScoreItem(
                    id=str(i), prompt=samples.prompts[i], response=samples.responses[i],
                    reference=str(truth) if truth is not None else None,
                    data_source=samples.data_sources[i],
                    uid=str(uid) if uid is not None else None))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                     for e in exc.errors())
                judged[i] = ScoreResult.failure(str(i), ResultStatus.INVALID,
                                                f"not a valid judge item: {problems}")
        return items

    def _statuses(self, judged: Sequence[ScoreResult | None]) -> list[str]:
        # Every sample asked about has a result; ``None`` means it was not asked.
        return [judge_status(r, self.config) for r in judged]

    def _examine(self, samples: _Samples, rule_scores: Sequence[float],
                 judged: Sequence[ScoreResult | None], statuses: Sequence[str],
                 lengths: Tensor, penalty: Tensor, reward: Tensor) -> None:
        """Print ``num_examine`` decoded examples per data source, as verl's managers do."""
        if self.num_examine <= 0:
            return
        printed: dict[str, int] = {}
        lengths_l, penalty_l, reward_l = lengths.tolist(), penalty.tolist(), reward.tolist()
        for i, source in enumerate(samples.data_sources):
            if printed.get(source, 0) >= self.num_examine:
                continue
            printed[source] = printed.get(source, 0) + 1
            result = judged[i]
            judge = f"{statuses[i]}" + (f" score={result.score}" if result is not None
                                        and result.score is not None else "") + (
                f" error={result.error}" if result is not None and result.error else "")
            print(f"[data_source] {source}\n[prompt] {samples.prompts[i]}\n"
                  f"[response] {samples.responses[i]}\n"
                  f"[ground_truth] {samples.ground_truths[i]}\n"
                  f"[rule_score] {rule_scores[i]}\n[judge] {judge}\n"
                  f"[length] {lengths_l[i]} [penalty] {penalty_l[i]}\n[reward] {reward_l[i]}")


def _as_config(value: LengthPenaltyConfig | Mapping[str, Any] | None) -> LengthPenaltyConfig:
    if isinstance(value, LengthPenaltyConfig):
        return value
    if value is None or isinstance(value, Mapping):
        return LengthPenaltyConfig.from_mapping(value)
    if hasattr(value, "keys"):  # a mapping-like object not registered as a Mapping
        return LengthPenaltyConfig.from_mapping({k: value[k] for k in value.keys()})  # noqa: SIM118
    raise TypeError(f"length_penalty_config must be a LengthPenaltyConfig, a mapping or None, "
                    f"not {type(value).__name__}")


def _column(non_tensor: Mapping[str, Any], key: str, size: int) -> list[Any]:
    """One ``non_tensor_batch`` column as plain Python values; ``None`` s if absent."""
    if key not in non_tensor:
        return [None] * size
    column = non_tensor[key]
    values = list(column.tolist() if hasattr(column, "tolist") else column)
    if len(values) != size:
        raise ValueError(f"non_tensor_batch[{key!r}] has {len(values)} entries for a batch "
                         f"of {size}")
    return values


def _plain(value: Any) -> Any:
    """A numpy scalar as its Python value (so uids hash and print like verl's strings)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def _global_step(data: DataProtoLike, default: int) -> int:
    meta = getattr(data, "meta_info", None)
    step = meta.get("global_steps") if isinstance(meta, Mapping) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else default
