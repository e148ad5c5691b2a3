"""slime's remote reward model, ``POST /slime/reward`` (``--rm-type remote_rm --rm-url``).

What slime's client does (``slime/rollout/rm_hub/__init__.py``, ``remote_rm``, at slime
commit 624b824a898ab0ec1fcb4d373004c7f3852bf515, that file last changed in
4c058f65c3d296db719f6cee9e7e67b2078b3e9c):

- one ``aiohttp`` POST per sample of ``{"prompt": sample.prompt, "response":
  sample.response, "label": sample.label}``; the prompt is a string or a list of chat
  messages (``{"role", "content"}``), the label a string or ``None``;
- the reply's JSON *is* the reward (``sample.reward``): a bare number, unless the run sets
  ``--reward-key``, which then indexes a dict;
- a shared session with a 120 s total timeout; any error (non-200 through
  ``raise_for_status``, timeout, network) is retried up to 10 attempts with backoff
  ``min(2**attempt, 30) + random()`` s, then raised.

So this endpoint answers the bare score; ``?reply=dict`` answers ``{"reward", "score",
"cached", "status"}`` for a run that sets ``--reward-key reward``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rewardq.broker.schemas import ResultStatus, ScoreResult
from rewardq.gateway.remote_rm import RewardMapping


class SlimeRequest(BaseModel):
    """The body slime's ``remote_rm`` posts."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: str | list[dict[str, Any]] = Field(description="Text, or chat messages.")
    response: str
    label: Any = None


def prompt_text(prompt: str | list[dict[str, Any]]) -> str:
    """A chat-message prompt as ``role: content`` lines (a string stays as it is)."""
    if isinstance(prompt, str):
        return prompt
    lines = []
    for message in prompt:
        content = message.get("content")
        if not isinstance(content, str):  # multimodal parts: keep their text
            parts = content if isinstance(content, list) else []
            content = " ".join(str(p.get("text")) for p in parts
                               if isinstance(p, dict) and p.get("text"))
        lines.append(f"{message.get('role', 'user')}: {content}")
    return "\n".join(lines)


def to_item(request: SlimeRequest, mapping: RewardMapping, item_id: str) -> dict[str, Any]:
    """The item JSON for slime's sample."""
    return mapping.item(item_id, prompt_text(request.prompt), request.response, request.label,
                        where="label")


def to_reply(result: ScoreResult, mapping: RewardMapping, *, as_dict: bool) -> Any:
    """The reward slime reads: a bare number, or a dict for ``--reward-key reward``.

    Raises:
        GatewayRequestError: 502/504 when the item was not scored and the mapping has no
            ``failed_reward``.
    """
    [reward] = mapping.rewards([result])
    if not as_dict:
        return reward
    return {"reward": reward, "score": result.score, "cached": result.cached,
            "status": ResultStatus(result.status).value}
