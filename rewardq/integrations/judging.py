"""How every trainer adapter asks the judge about a step's samples.

Two rules hold on every path. A sample that is no valid item fails alone with its
``invalid`` result, never its whole step (:func:`without_invalid`). Identical samples
(common within a GRPO group) are judged once: the fleet dedups them by the fingerprint of
their view (``rewardq.broker.keys``), and in-process judging asks its ``SyncJudge`` once
per distinct fingerprint (:func:`judge_key`, :func:`score_each_once`), the others getting
the first's result under their own id (:func:`shared_result`).
"""

from __future__ import annotations

from collections.abc import Sequence

from rewardq.broker.errors import InvalidItemError
from rewardq.broker.keys import judge_fingerprints
from rewardq.broker.schemas import ResultStatus, ScoreItem, ScoreResult
from rewardq.judge.rollout_view import view_items
from rewardq.judge.rubrics import RubricBook
from rewardq.producer.sync_judge import SyncJudge

__all__ = ["judge_key", "score_each_once", "shared_result", "without_invalid"]


def without_invalid(rubrics: RubricBook, items: Sequence[ScoreItem],
                    judged: list[ScoreResult | None]) -> list[ScoreItem]:
    """``items`` less those the producer would refuse, each of which gets its ``invalid``
    result in ``judged`` (at the position its id names), so that one bad item fails
    alone instead of failing the submit of its whole step.

    ``RewardClient.submit`` and ``SyncJudge.score`` check every item's rubric (a name the
    run does not know, a correctness rubric without a reference) and refuse the whole
    list for one bad item; this checks the list once and only looks at the items one by
    one when it holds a bad one.
    """
    try:
        rubrics.assign(items)
    except InvalidItemError:
        pass
    else:
        return list(items)
    kept: list[ScoreItem] = []
    for item in items:
        try:
            rubrics.assign([item])
        except InvalidItemError as exc:
            judged[int(item.id)] = ScoreResult.failure(item.id, ResultStatus.INVALID,
                                                       f"not a valid judge item: {exc}")
        else:
            kept.append(item)
    return kept


def judge_key(judge: SyncJudge, item: ScoreItem) -> tuple[ScoreItem, str] | ScoreResult:
    """``item`` with its rubric assigned and what identifies it to the judge: the
    fingerprint of its view (``rewardq.judge.rollout_view``), the key the fleet caches and
    dedups its verdicts under; or, for an item that gets no judge call, its result
    (``no_answer``: nothing to judge; ``invalid``: its rubric is unknown or needs a
    reference it lacks)."""
    try:
        [assigned] = judge.rubrics.assign([item])
    except InvalidItemError as exc:
        return ScoreResult.failure(item.id, ResultStatus.INVALID,
                                   f"not a valid judge item: {exc}")
    [viewed] = view_items([assigned], judge.spec, judge.rubrics)
    if isinstance(viewed, ScoreResult):
        return viewed
    return assigned, judge_fingerprints(judge.spec, [viewed])[0]


def shared_result(result: ScoreResult, item_id: str) -> ScoreResult:
    """``result`` as the answer of an identical item judged by another's call: its id,
    no attempts of its own, and ``cached`` when it carries a verdict (as the fleet marks
    the items that joined another's call)."""
    return result.model_copy(update={"id": item_id, "attempts": 0,
                                     "cached": result.status is ResultStatus.OK})


def score_each_once(judge: SyncJudge, items: Sequence[ScoreItem]) -> list[ScoreResult]:
    """``SyncJudge`` results for ``items``, in order, with one judge call per distinct
    fingerprint: identical samples share one call, as the fleet's in-flight dedup makes
    them. Never raises for an item: a bad one comes back ``invalid``, one without a final
    answer ``no_answer``.
    """
    results: list[ScoreResult | None] = [None] * len(items)
    owners: dict[str, int] = {}
    followers: list[tuple[int, int]] = []
    to_judge: list[tuple[int, ScoreItem]] = []
    for i, item in enumerate(items):
        keyed = judge_key(judge, item)
        if isinstance(keyed, ScoreResult):
            results[i] = keyed
            continue
        assigned, key = keyed
        owner = owners.setdefault(key, i)
        if owner == i:
            to_judge.append((i, assigned))
        else:
            followers.append((i, owner))
    once: dict[int, ScoreResult] = {}
    for i, assigned in to_judge:
        results[i] = once[i] = judge.score_one(assigned)
    for i, owner in followers:
        results[i] = shared_result(once[owner], items[i].id)
    return [r for r in results if r is not None]
