"""verl >= 0.7: rewardq as a reward-loop manager and as a custom reward function.

verl >= 0.7 scores every sample alone: ``RewardLoopWorker`` processes call
``await reward_manager.run_single(data)`` once per sample, in the batch path
(``RewardLoopManager.compute_rm_score``: the padded batch split over the workers, then
``assemble_rm_scores``) and, by default, streamed from the agent loop as each rollout
finishes. Two entry points (verl 0.7-0.9; verl <= 0.6 uses
``rewardq.integrations.verl_batch.LengthPenaltyRewardManager``), which verl configs name
through ``rewardq.verl`` (it re-exports them):

``RewardqRewardManager`` (reward = rule + reward_coefficient * judge - penalty_scale *
penalty)::

    reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://rewardq.verl
    reward.reward_manager.name=RewardqRewardManager
    +reward.reward_kwargs.rewardq.use_async_io=true
    +reward.reward_kwargs.rewardq.settings.redis_url=redis://redis-host:6379/0

``compute_score`` (judge score only, for verl's own managers)::

    reward.custom_reward_function.path=pkg://rewardq.verl
    reward.custom_reward_function.name=compute_score

Options live under ``reward.reward_kwargs.rewardq`` (not in verl's schema, hence the
``+``): every ``LengthPenaltyConfig`` field, ``settings`` (a mapping overriding
``REWARDQ_*``), and the group options of :class:`VerlOptions`.

Identical samples (a GRPO group whose rollouts wrote the same text) are judged once.
With ``use_async_io=true`` the fleet dedups them by fingerprint, across every reward-loop
process. With ``use_async_io=false`` each process's in-process judge does so itself: the
samples it scores share one call per fingerprint while it is in flight, and a verdict it
has made answers the same text again (the latest ``SYNC_RECENT_VERDICTS``); identical
samples that verl's batch path deals to two processes are judged once in each.

A sample that is no valid judge item, or whose rollout has no final answer to show the
judge (empty, or its thinking cut at the length limit), fails alone with its status
(``judge_status``: ``invalid``, ``no_answer``) and gets ``on_judge_failure``, like every
other status but ``ok``; the length penalty counts the full rollout's tokens.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from rewardq.extras import require

require("rewardq.integrations.verl", "trainer")  # before torch: a one-line error without it

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rewardq.broker.errors import InvalidItemError
from rewardq.broker.schemas import ResultStatus, ScoreItem, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.integrations.judging import judge_key, shared_result
from rewardq.judge.conversation import conversation_text
from rewardq.judge.rollout_view import THINKING_TAGS, ends_inside_thinking
from rewardq.producer.async_client import AsyncRewardClient
from rewardq.producer.config import LengthPenaltyConfig
from rewardq.producer.groups import GroupMedian, GroupMedians, GroupStatus, member_id
from rewardq.producer.penalties import group_median_penalty, length_penalty
from rewardq.producer.rewards import combine_rewards, judge_score, judge_status
from rewardq.producer.sync_judge import SyncJudge

try:  # verl is the caller's; rewardq does not depend on it
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
except ImportError:  # pragma: no cover - exercised only without verl installed
    RewardManagerBase = object  # type: ignore[assignment,misc]

__all__ = ["EXTRA_KEYS", "RewardqRewardManager", "VerlOptions", "compute_score"]

log = logging.getLogger(__name__)

#: ``reward_extra_info`` keys of every sample (verl builds its columns from the first).
EXTRA_KEYS = ("rule_score", "judge_score", "judge_status", "length", "group_median",
              "group_size", "group_status", "penalty", "reward")
#: ``extra_info["split"]`` values that mark a validation sample (verl's data scripts).
VALIDATION_SPLITS = frozenset({"test", "val", "valid", "validation"})
#: Verdicts the in-process judge (``use_async_io=false``) keeps per process, by
#: fingerprint, for identical samples that come after the first was judged.
SYNC_RECENT_VERDICTS = 4096


class VerlOptions(BaseModel):
    """``reward.reward_kwargs.rewardq`` besides the ``LengthPenaltyConfig`` fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of REWARDQ_* (e.g. redis_url).")
    group_size: int | None = Field(
        default=None, ge=1, description="Samples per uid in training; default "
                                        "actor_rollout_ref.rollout.n.")
    val_group_size: int | None = Field(
        default=None, ge=1, description="Samples per uid in validation; default "
                                        "actor_rollout_ref.rollout.val_kwargs.n.")
    group_wait_s: float = Field(
        default=300.0, gt=0, description="How long a sample waits for its group's other "
                                         "samples before the group is sealed as it is.")
    group_settle_s: float = Field(
        default=2.0, ge=0, description="How long identical repeats wait for a distinct "
                                       "sibling before they count as genuine samples.")
    window_ms: float = Field(
        default=5.0, ge=0, description="Coalescing window of concurrent judge calls.")


class RewardqRewardManager(RewardManagerBase):  # type: ignore[misc,valid-type,unused-ignore]
    """A verl reward-loop manager: rule score, LLM judge through rewardq, length penalty.

    Built by verl as ``(config, tokenizer, compute_score, reward_router_address=None,
    reward_model_tokenizer=None)``; ``compute_score`` is verl's resolved rule function.

    Raises:
        ConfigError / pydantic.ValidationError: the ``rewardq`` options are invalid.
    """

    def __init__(self, config: Any, tokenizer: Any, compute_score: Any,
                 reward_router_address: str | None = None,
                 reward_model_tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer, compute_score)
        self.compute_score = compute_score
        self.reward_router_address = reward_router_address
        self.reward_model_tokenizer = reward_model_tokenizer
        raw = _plain(_get(_get(_get(config, "reward"), "reward_kwargs"), "rewardq")) or {}
        penalty_keys = set(LengthPenaltyConfig.model_fields)
        self.config_lp = LengthPenaltyConfig.from_mapping(
            {k: v for k, v in raw.items() if k in penalty_keys})
        self.options = VerlOptions.model_validate(
            {k: v for k, v in raw.items() if k not in penalty_keys})
        rollout = _get(_get(config, "actor_rollout_ref"), "rollout")
        self.group_size = self.options.group_size or int(_get(rollout, "n") or 1)
        self.val_group_size = self.options.val_group_size or int(
            _get(_get(rollout, "val_kwargs"), "n") or 1)
        # The config's judge model and URL, when set, win over the settings mapping.
        overrides = {"judge_model": self.config_lp.model_name,
                     "judge_base_url": self.config_lp.judge_base_url}
        self.settings = Settings(**{**self.options.settings,
                                    **{k: v for k, v in overrides.items() if v}})
        self._client: AsyncRewardClient | None = None
        #: Clients for groups of another size than group judging's (validation's, say).
        self._sized_clients: dict[int, AsyncRewardClient] = {}
        self._groups: GroupMedians | None = None
        self._sync_judge: SyncJudge | None = None
        #: In-process judging: the call in flight and the latest ok results, by fingerprint.
        self._sync_calls: dict[str, asyncio.Task[ScoreResult]] = {}
        self._sync_recent: OrderedDict[str, ScoreResult] = OrderedDict()

    # ------------------------------------------------------------------ resources

    @property
    def client(self) -> AsyncRewardClient:
        """The per-process asyncio client (built on first use)."""
        if self._client is None:
            self._client = AsyncRewardClient(self.settings,
                                             window_s=self.options.window_ms / 1000)
        return self._client

    def client_for(self, group_size: int) -> AsyncRewardClient:
        """The client that judges samples whose groups have ``group_size`` members.

        Group judging (``REWARDQ_JUDGE_GROUP_MODE``) waits for ``judge_group_size``
        members per uid; groups of another size (validation's ``val_kwargs.n``, often 1)
        are judged with their own size, and a sample alone is judged alone.
        """
        settings = self.settings
        if settings.judge_group_mode is None or group_size == settings.judge_group_size:
            return self.client
        client = self._sized_clients.get(group_size)
        if client is None:
            update: dict[str, Any] = ({"judge_group_size": group_size} if group_size >= 2
                                      else {"judge_group_mode": None})
            client = self._sized_clients[group_size] = AsyncRewardClient(
                settings.model_copy(update=update), window_s=self.options.window_ms / 1000)
        return client

    @property
    def groups(self) -> GroupMedians:
        """Group coordination through the client's Redis (built on first use)."""
        if self._groups is None:
            self._groups = GroupMedians(self.client.client.redis, self.client.run_blocking,
                                        wait_s=self.options.group_wait_s,
                                        settle_s=self.options.group_settle_s)
        return self._groups

    # ------------------------------------------------------------------ one sample

    async def run_single(self, data: Any) -> dict[str, Any]:
        """The reward of one sample (``data`` holds one row; the last one counts).

        Returns:
            ``{"reward_score": float, "reward_extra_info": {EXTRA_KEYS..., and the
            rule function's extra keys}}``.
        """
        item = data[-1:][0]
        loop = asyncio.get_running_loop()
        prompts = item.batch["prompts"]
        responses = item.batch["responses"]
        mask = item.batch["attention_mask"]
        prompt_len, response_len = prompts.shape[-1], responses.shape[-1]
        length = int(mask[-response_len:].sum())
        prompt_ids = prompts[mask[:prompt_len].bool()].tolist()
        response_ids = responses[:length].tolist()
        non_tensor = item.non_tensor_batch
        data_source = non_tensor.get("data_source", "unknown")
        reward_model = non_tensor.get("reward_model") or {}
        ground_truth = reward_model.get("ground_truth") if isinstance(
            reward_model, Mapping) else None
        extra_info = dict(non_tensor.get("extra_info") or {})
        uid = non_tensor.get("uid")
        uid = None if uid is None else str(uid)

        tokenizer: Any = self.tokenizer  # any Hugging Face tokenizer
        (prompt_text, opened), response_text = await loop.run_in_executor(None, lambda: (
            _judge_prompt(non_tensor.get("raw_prompt"), tokenizer, prompt_ids),
            tokenizer.decode(response_ids, skip_special_tokens=True)))
        rule, rule_extra = await self._rule(data_source, response_text, ground_truth,
                                            extra_info)
        cfg = self.config_lp
        expected = self._expected_group_size(data, extra_info)
        member = sample_member(prompt_ids, response_ids, non_tensor.get("priority"))
        group_task = None
        if cfg.enable and cfg.penalty_shape == "group_median":
            group_task = asyncio.ensure_future(self.groups.median(
                uid, member, length, expected))
        # A rollout that starts inside the <think> its generation prompt opened shows the
        # judge that tag, so that a rollout cut inside its thinking has no final answer.
        judged = await self._judge(rule, prompt_text,
                                   THINKING_TAGS[0][0] + response_text if opened
                                   else response_text,
                                   ground_truth, data_source, uid, member, expected)
        group = await group_task if group_task is not None else GroupMedian(
            float(length), 1, GroupStatus.SINGLE)
        if group.status is GroupStatus.INCOMPLETE:
            log.warning("group %s sealed with %d of %d samples after %.0f s; its median "
                        "(%.1f) is over the samples that arrived", uid, group.size,
                        expected, self.options.group_wait_s, group.median)

        lengths = torch.tensor([length], dtype=torch.long)
        if cfg.penalty_shape == "group_median":
            penalty = (group_median_penalty(lengths, torch.tensor([group.median]), cfg)
                       if cfg.enable else torch.zeros(1))
        else:
            penalty = length_penalty(lengths, None, cfg)
        reward = float(combine_rewards(torch.tensor([rule], dtype=torch.float64),
                                       [judged], penalty, cfg)[0])
        extra: dict[str, Any] = {
            "rule_score": rule,
            "judge_score": judge_score(judged),
            "judge_status": judge_status(judged, cfg),
            "length": length,
            "group_median": group.median,
            "group_size": group.size,
            "group_status": group.status.value,
            "penalty": float(penalty[0]),
            "reward": reward,
        }
        for key, value in rule_extra.items():
            extra.setdefault(key, value)
        return {"reward_score": reward, "reward_extra_info": extra}

    def _expected_group_size(self, data: Any, extra_info: Mapping[str, Any]) -> int:
        """``val_group_size`` for validation samples, else ``group_size``.

        The batch path says so in ``meta_info["validate"]``; a streamed sample has an
        empty ``meta_info``, so its dataset's ``extra_info["split"]`` decides (verl's data
        scripts write it). A validation sample that carries neither waits ``group_wait_s``
        for siblings that never come, then is sealed ``incomplete``.
        """
        meta = getattr(data, "meta_info", None) or {}
        validating = bool(meta.get("validate")) or str(
            extra_info.get("split", "")).lower() in VALIDATION_SPLITS
        return self.val_group_size if validating else self.group_size

    async def _rule(self, data_source: Any, response: str, ground_truth: Any,
                    extra_info: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        rule: Any = self.compute_score  # verl's resolved rule function, or None
        if rule is None:
            return 0.0, {}
        kwargs = {"data_source": data_source, "solution_str": response,
                  "ground_truth": ground_truth, "extra_info": extra_info}
        if inspect.iscoroutinefunction(rule):
            answer = await rule(**kwargs)
        else:
            answer = await asyncio.get_running_loop().run_in_executor(
                None, lambda: rule(**kwargs))
        if isinstance(answer, Mapping):
            return float(answer["score"]), {k: v for k, v in answer.items() if k != "score"}
        return float(answer), {}

    async def _judge(self, rule: float, prompt: str, response: str, ground_truth: Any,
                     data_source: Any, uid: str | None, member: str, group_size: int
                     ) -> ScoreResult | None:
        cfg = self.config_lp
        if not cfg.enable_openai_reward or (cfg.judge_when == "correct_only" and rule <= 0):
            return None
        try:
            # The sample's own id: group judging counts a group's members by item id.
            item = ScoreItem(id=member, prompt=prompt, response=response,
                             reference=None if ground_truth is None else str(ground_truth),
                             data_source=None if data_source is None else str(data_source),
                             uid=uid)
        except ValidationError as exc:
            return ScoreResult.failure(member, ResultStatus.INVALID,
                                       f"not a valid judge item: {exc.errors()[0]['msg']}")
        if not cfg.use_async_io:
            return await self._judge_in_process(item)
        try:
            return await asyncio.wait_for(self.client_for(group_size).score(item),
                                          timeout=cfg.score_timeout_s)
        except InvalidItemError as exc:  # this sample's alone (an unknown rubric, say)
            return ScoreResult.failure(item.id, ResultStatus.INVALID,
                                       f"not a valid judge item: {exc}")
        except TimeoutError:
            return ScoreResult.failure(item.id, ResultStatus.TIMEOUT,
                                       f"no judge result within {cfg.score_timeout_s}s")

    async def _judge_in_process(self, item: ScoreItem) -> ScoreResult:
        """``use_async_io=false``: the in-process ``SyncJudge``, one call per fingerprint
        among the samples of this process (in flight, or among its latest verdicts)."""
        cfg = self.config_lp
        if self._sync_judge is None:
            self._sync_judge = SyncJudge(self.settings, api_key=cfg.api_key,
                                         timeout_s=cfg.judge_timeout_s)
        judge = self._sync_judge
        loop = asyncio.get_running_loop()
        keyed = await loop.run_in_executor(None, judge_key, judge, item)
        if isinstance(keyed, ScoreResult):  # invalid, or no_answer: no call
            return keyed
        assigned, key = keyed
        recent = self._sync_recent.get(key)
        if recent is not None:
            self._sync_recent.move_to_end(key)
            return shared_result(recent, item.id)
        call = self._sync_calls.get(key)
        if call is not None and call.get_loop() is loop:
            return shared_result(await asyncio.shield(call), item.id)
        call = loop.create_task(self._call_in_process(judge, key, assigned))
        self._sync_calls[key] = call
        return await asyncio.shield(call)

    async def _call_in_process(self, judge: SyncJudge, key: str, item: ScoreItem
                               ) -> ScoreResult:
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                None, judge.score_one, item)
        finally:
            if self._sync_calls.get(key) is asyncio.current_task():
                del self._sync_calls[key]
        if result.status is ResultStatus.OK:
            self._sync_recent[key] = result
            if len(self._sync_recent) > SYNC_RECENT_VERDICTS:
                self._sync_recent.popitem(last=False)
        return result


# --------------------------------------------------------------------------- compute_score

_shared: dict[str, AsyncRewardClient] = {}


async def compute_score(data_source: Any, solution_str: str, ground_truth: Any,
                        extra_info: Mapping[str, Any] | None = None, **_: Any
                        ) -> dict[str, Any]:
    """verl ``custom_reward_function``: the judge's score of one response, in [0, 1].

    verl passes no prompt to a reward function, so the question is read from
    ``extra_info["prompt"]`` or ``extra_info["question"]`` (verl's data scripts write
    ``question``). Settings come from ``REWARDQ_*`` in the reward-loop worker's
    environment.

    Returns:
        ``{"score": judge score (0.0 unless ok), "judge_status": a ``ResultStatus``
        value}``; the status makes a failure visible in verl's metrics. An empty
        response, or one whose thinking was never closed, is ``no_answer``; a sample
        that is no valid item (no question, an unknown rubric) is ``invalid``.
    """
    info = extra_info or {}
    question = info.get("prompt") or info.get("question")
    if not question:
        return {"score": 0.0, "judge_status": ResultStatus.INVALID.value}
    client = _shared.get("client")
    if client is None:
        client = _shared["client"] = AsyncRewardClient(Settings())
    try:
        item = ScoreItem(id="sample", prompt=str(question), response=solution_str,
                         reference=None if ground_truth is None else str(ground_truth),
                         data_source=None if data_source is None else str(data_source))
    except ValidationError:
        return {"score": 0.0, "judge_status": ResultStatus.INVALID.value}
    try:
        result = await client.score(item)
    except InvalidItemError:
        return {"score": 0.0, "judge_status": ResultStatus.INVALID.value}
    ok = result.status is ResultStatus.OK and result.score is not None
    return {"score": float(result.score) if ok and result.score is not None else 0.0,
            "judge_status": result.status.value}


# --------------------------------------------------------------------------- helpers


#: Prompt tokens decoded to see whether the generation prompt opened a thinking block.
_PROMPT_TAIL_TOKENS = 32


def _judge_prompt(raw_prompt: Any, tokenizer: Any, prompt_ids: list[int]
                  ) -> tuple[str, bool]:
    """The question the judge is shown, and whether the rollout starts inside a thinking
    block that the generation prompt opened.

    The question is verl's ``raw_prompt`` (the dataset's chat messages, which verl >= 0.8
    keeps beside the tokens) as a conversation, else the prompt tokens decoded without
    their special tokens. The messages do not hold the generation prompt, so whether it
    opened ``<think>`` (R1-style templates) is read from the last prompt tokens.
    """
    if raw_prompt is not None and not isinstance(raw_prompt, Mapping):
        text = raw_prompt if isinstance(raw_prompt, str) else conversation_text(
            list(raw_prompt))
        if text.strip():
            tail = tokenizer.decode(prompt_ids[-_PROMPT_TAIL_TOKENS:],
                                    skip_special_tokens=True)
            return text, ends_inside_thinking(str(tail))
    return str(tokenizer.decode(prompt_ids, skip_special_tokens=True)), False


def sample_member(prompt_ids: Any, response_ids: Any, priority: Any) -> str:
    """A sample's identity among its group's members (its judge item id, and its member
    id for the group median).

    Its tokens' :func:`member_id`, so that the copies of the first rows that verl's batch
    path pads with count as their originals, and verl's per-sample ``priority`` where the
    batch carries one (verl >= 0.9 gives each sample of a step its place in the batch;
    the padding copies keep their original's), so that two rollouts of one group that
    wrote the same tokens are two members. Without ``priority`` (verl < 0.9), such
    rollouts are one member: the group median waits ``group_settle_s`` before it counts
    them, and group judging finds their group a member short (its samples end
    ``timeout`` at the chunk deadline).
    """
    member = member_id(prompt_ids, response_ids)
    return member if priority is None else f"{member}.{str(priority)[:64]}"


def _get(node: Any, key: str) -> Any:
    """``node[key]`` for a DictConfig, a mapping or an attribute holder; ``None`` if absent."""
    if node is None:
        return None
    if isinstance(node, Mapping) or hasattr(node, "get"):
        return node.get(key)
    return getattr(node, key, None)


def _plain(node: Any) -> Any:
    """An OmegaConf node as plain containers (interpolations resolved)."""
    if node is None:
        return None
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover
        return dict(node)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)
