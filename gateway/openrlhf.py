"""OpenRLHF's remote reward-model protocol, ``POST /get_reward``.

What OpenRLHF's client does (``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor``,
at OpenRLHF commit 3c3be6234e0cb353e76bb8019947db9dfe99fca7, that file last changed in
ed62d0e20dea08397251eba5e010ee9dabc4d048):

- ``--reward.remote_url`` (``--remote_rm_url`` in older releases) is split on commas;
  each finished rollout is scored on its own, as soon as it is generated, by one
  ``aiohttp`` POST of ``{"query": [query], "prompts": [prompt], "labels": [label]}``.
  ``query`` is ``tokenizer.decode(prompt_ids + response_ids,
  skip_special_tokens=False)``: the whole sequence, prompt included (left-truncated
  when too long); ``prompts`` is the prompt string; ``labels`` the dataset label (often
  a reference answer, possibly ``None``). Lists, so a server may take batches.
- It reads ``reply["rewards"]`` as the reward, ``reply["scores"]`` (falling back to the
  rewards) for dynamic filtering, expected in [0, 1], and ``reply.get("extra_logs")``, a
  dict of per-sample values logged as metrics. Its own server
  (``openrlhf/cli/serve_rm.py``) answers lists: ``{"rewards": [r], "scores": [r],
  "extra_logs": {...}}``.
- Non-200 (``raise_for_status``) and any other error, its 180 s total timeout included:
  logged, 1 s sleep, up to 5 attempts; then the sample keeps no reward (``None``).
  No headers are sent, so auth rides in the URL (``http://NAME:TOKEN@host/get_reward``,
  which aiohttp sends as basic auth).

What OpenRLHF 0.7.5 - 0.8.x do instead (``openrlhf/utils/remote_rm_utils.py``,
``request_api_wrapper`` and ``remote_rm_fn_ray``, at tag v0.8.11 = commit
ac3689ece2666cb524836568b88bfc6016dabc6f): the whole step's rollouts in one ``requests``
POST per URL of ``--remote_rm_url`` (the batch is split evenly over the URLs), read
timeout 180 s, 5 tries 1 s apart, then an exception that ends the run. They
``torch.cat`` every ``extra_logs`` value as if it were a tensor
(``experience_maker.update_samples_with_rewards``), which fails on the JSON lists of
any server; 0.9.0 reads them as numbers. So ``extra_logs`` can be left out
(``?extra_logs=0`` or ``REWARDQ_GATEWAY_OPENRLHF_EXTRA_LOGS=false``).

Here the reply's lists have one entry per query, and ``extra_logs`` carries
``rewardq_ok``, ``rewardq_cached`` and ``rewardq_no_answer`` (1.0/0.0 per query), which
OpenRLHF logs beside its own metrics. An empty ``query`` list (OpenRLHF's split of a
one-rollout batch over several URLs sends one) is answered with empty lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewardq.broker.schemas import ResultStatus, ScoreResult
from rewardq.gateway.remote_rm import RewardMapping


class OpenRLHFRequest(BaseModel):
    """The body OpenRLHF's remote-RM client posts."""

    # Unknown keys are ignored: a newer OpenRLHF adding one keeps working.
    model_config = ConfigDict(extra="ignore", frozen=True)

    query: list[str] = Field(description="Decoded prompt + response, one per sample.")
    prompts: list[str] | None = Field(default=None, description="The prompts, same order.")
    labels: list[Any] | None = Field(default=None, description="Dataset labels, same order.")

    @model_validator(mode="after")
    def _same_lengths(self) -> OpenRLHFRequest:
        for name in ("prompts", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.query):
                raise ValueError(f"{name} has {len(values)} entries, query {len(self.query)}")
        return self


class OpenRLHFReply(BaseModel):
    """What ``POST /get_reward`` answers (the shape of OpenRLHF's own ``serve_rm``)."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] | None = None


def to_items(request: OpenRLHFRequest, mapping: RewardMapping, tag: str
             ) -> tuple[list[dict[str, Any]], int]:
    """Item JSON per query, and how many queries did not start with their prompt.

    With ``response_from="strip_prompt"`` the response is what follows the prompt in the
    query; a query that does not start with it (the prompt was truncated, or decoding
    did not reproduce it) is judged whole, as with ``response_from="query"``.

    Args:
        request: the posted body.
        mapping: label and response mapping.
        tag: makes the item ids (``<tag>-<n>``) unique to this request.
    """
    items = []
    mismatched = 0
    for n, query in enumerate(request.query):
        prompt = request.prompts[n] if request.prompts is not None else ""
        label = request.labels[n] if request.labels is not None else None
        response = query
        if mapping.response_from == "strip_prompt" and prompt:
            if query.startswith(prompt):
                response = query[len(prompt):]
            else:
                mismatched += 1
        items.append(mapping.item(f"{tag}-{n}", prompt or query, response, label,
                                  where=f"labels[{n}]"))
    return items, mismatched


def to_reply(results: Sequence[ScoreResult], mapping: RewardMapping) -> OpenRLHFReply:
    """The reply OpenRLHF reads: rewards and scores (the judge's [0, 1] score) per query,
    and ``extra_logs`` unless the mapping leaves them out.

    Raises:
        GatewayRequestError: 502/504 when an item was not scored and the mapping has no
            ``failed_reward``.
    """
    rewards = mapping.rewards(results)
    if not mapping.extra_logs:
        return OpenRLHFReply(rewards=rewards, scores=list(rewards))
    return OpenRLHFReply(rewards=rewards, scores=list(rewards), extra_logs={
        "rewardq_ok": [float(r.status == ResultStatus.OK) for r in results],
        "rewardq_cached": [float(r.cached) for r in results],
        "rewardq_no_answer": [float(r.status == ResultStatus.NO_ANSWER) for r in results],
    })
