"""What the remote-reward-model protocols share: how a sample becomes an item, and how a
result becomes a reward.

OpenRLHF (:mod:`gateway.openrlhf`) and slime (:mod:`gateway.slime`) send a prompt, a
response (or the whole decoded sequence) and a dataset ``label``, and read back a
number. What rewardq makes of the label is a choice (:class:`RewardMapping`), set per
deployment (``REWARDQ_GATEWAY_*``) and overridable per endpoint URL with query
parameters, so one gateway serves a math run and a chat run at once, e.g.
``/get_reward?label_as=metadata``.

A result that is not ``ok`` has no score. A remote-RM client needs a number, and both
clients retry any non-200 reply (OpenRLHF 5 times, 1 s apart; slime 10 times with
exponential backoff), so by default the request fails with 502 and the client's retry
finds the verdicts that did succeed in the cache; ``gateway_failed_reward`` gives such
items a fixed reward instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from broker.schemas import ResultStatus, ScoreResult
from broker.settings import Settings
from gateway.errors import GatewayRequestError

LabelAs = Literal["reference", "metadata"]
ResponseFrom = Literal["strip_prompt", "query"]
_LABEL_AS: tuple[LabelAs, ...] = ("reference", "metadata")
_RESPONSE_FROM: tuple[ResponseFrom, ...] = ("strip_prompt", "query")


@dataclass(frozen=True)
class RewardMapping:
    """How remote-RM fields map onto items, and results onto rewards.

    Attributes:
        label_as: ``reference``: a label becomes the item's reference answer (the judge's
            correctness rubric); ``metadata``: it is kept in ``metadata["label"]`` only
            (the quality rubric).
        response_from: OpenRLHF only: ``strip_prompt`` judges the part of its ``query``
            after the prompt; ``query`` judges the whole decoded sequence.
        failed_reward: the reward of an item that was not scored; ``None``: the request
            fails with 502.
    """

    label_as: LabelAs = "reference"
    response_from: ResponseFrom = "strip_prompt"
    failed_reward: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RewardMapping:
        """The deployment's mapping (``REWARDQ_GATEWAY_LABEL_AS`` and friends)."""
        return cls(label_as=settings.gateway_label_as,
                   response_from=settings.gateway_response_from,
                   failed_reward=settings.gateway_failed_reward)

    def with_query(self, params: Mapping[str, str]) -> RewardMapping:
        """This mapping with ``label_as``, ``response_from`` and ``failed_reward`` from an
        endpoint URL's query string.

        Raises:
            GatewayRequestError: 422 for an unknown value.
        """
        mapping = self
        label_as = params.get("label_as")
        if label_as is not None:
            if label_as not in _LABEL_AS:
                raise _bad_param("label_as", label_as, _LABEL_AS)
            mapping = replace(mapping, label_as=label_as)
        response_from = params.get("response_from")
        if response_from is not None:
            if response_from not in _RESPONSE_FROM:
                raise _bad_param("response_from", response_from, _RESPONSE_FROM)
            mapping = replace(mapping, response_from=response_from)
        failed = params.get("failed_reward")
        if failed is not None:
            try:
                mapping = replace(mapping, failed_reward=float(failed))
            except ValueError:
                raise _bad_param("failed_reward", failed, ("a number",)) from None
        return mapping

    def item(self, item_id: str, prompt: str, response: str, label: Any) -> dict[str, Any]:
        """The item JSON for one sample (validated later, with every other item)."""
        item: dict[str, Any] = {"id": item_id, "prompt": prompt, "response": response}
        reference = _as_reference(label)
        if self.label_as == "reference" and reference is not None:
            item["reference"] = reference
        elif label is not None:
            item["metadata"] = {"label": label}
        return item

    def rewards(self, results: Sequence[ScoreResult]) -> list[float]:
        """One reward per result: its score, or ``failed_reward`` when not ``ok``.

        Raises:
            GatewayRequestError: 502 ``not_scored`` naming the items without a score,
                when ``failed_reward`` is unset.
        """
        unscored = [r for r in results if r.status != ResultStatus.OK or r.score is None]
        if unscored and self.failed_reward is None:
            detail = "; ".join(f"{r.id}: {ResultStatus(r.status).value}: {r.error}"
                               for r in unscored[:3])
            raise GatewayRequestError(
                502, "not_scored",
                f"{len(unscored)} of {len(results)} item(s) could not be scored ({detail}); "
                f"retry, or set REWARDQ_GATEWAY_FAILED_REWARD to give them a fixed reward")
        return [r.score if r.status == ResultStatus.OK and r.score is not None
                else float(self.failed_reward or 0.0) for r in results]


def _as_reference(label: Any) -> str | None:
    """A label usable as a reference answer: a non-empty string, or a number."""
    if isinstance(label, str):
        return label if label.strip() else None
    if isinstance(label, int | float) and not isinstance(label, bool):
        return json.dumps(label)
    return None


def _bad_param(name: str, value: str, allowed: Sequence[str]) -> GatewayRequestError:
    return GatewayRequestError(422, "invalid_request",
                               f"query parameter {name}={value!r}: expected "
                               f"{' or '.join(allowed)}")
