"""Ensembles: K judges (models, or samples of one) per item, and how their verdicts combine;
pure, no I/O.

Each member is an ordinary single-judge call kind: its own ``JudgeSpec`` (the member's
model), so its own cache entries, in-flight dedup, rate limit and retries. A member that
judged an item alone before is a cache hit in the ensemble. Repeated samples of one model
(``spec.samples > 1``, meant for temperature > 0) are told apart by a suffix on the
fingerprint (``#1``, ``#2``; the first sample is the plain call).

The item's result is ``ok`` only if every member's is; otherwise it carries the first
failure, naming the member. Aggregation:

* ``mean``: the mean of the members' normalized (and raw) scores.
* ``majority``: the most common raw score; a tie goes to the lowest of the tied scores
  (a contested reward errs low).

``agreement`` is the share of members that gave the most common raw score (1.0 when all
agree), and ``judges`` lists each member's scores, so a trainer can down-weight contested
rewards.
"""

from __future__ import annotations

import math
from collections import Counter

from rewardq.broker.schemas import (
    Aggregate,
    JudgeScore,
    JudgeSpec,
    ResultStatus,
    ScoreResult,
    Usage,
)

__all__ = ["aggregate", "ensemble_members"]

#: (label, the member's spec, the suffix its cache entries carry)
Member = tuple[str, JudgeSpec, str]


def ensemble_members(spec: JudgeSpec) -> list[Member]:
    """The single-judge call kinds ``spec`` asks for: one per model and sample.

    Without an ensemble (no ``judges``, one sample) it is ``spec`` itself, unchanged.
    """
    models = spec.judges or (spec.model,)
    if len(models) == 1 and spec.samples == 1:
        return [(models[0], spec if models[0] == spec.model
                 else spec.model_copy(update={"model": models[0], "judges": ()}), "")]
    members = []
    for model in models:
        single = spec.model_copy(update={"model": model, "judges": (), "samples": 1})
        for k in range(spec.samples):
            suffix = f"#{k}" if k else ""
            members.append((model + suffix, single, suffix))
    return members


def aggregate(mode: Aggregate, labels: list[str], results: list[ScoreResult]) -> ScoreResult:
    """One item's result from its members' results (same item, in ``labels`` order)."""
    first = results[0]
    failed = next((r for r in results if r.status is not ResultStatus.OK), None)
    if failed is not None:
        label = labels[results.index(failed)]
        return ScoreResult.failure(first.id, failed.status, f"judge {label}: {failed.error}",
                                   attempts=sum(r.attempts for r in results),
                                   latency_ms=max(r.latency_ms for r in results))
    pairs = [(r.score or 0.0, r.raw_score or 0.0) for r in results]  # ok: both are set
    counts = Counter(raw for _, raw in pairs)
    top = max(counts.values())
    if mode == "majority":
        modal = min(raw for raw, n in counts.items() if n == top)
        score, raw_score = next(p for p in pairs if p[1] == modal)
    else:
        score = math.fsum(s for s, _ in pairs) / len(pairs)
        raw_score = math.fsum(raw for _, raw in pairs) / len(pairs)
    usage = Usage(prompt_tokens=sum(r.usage.prompt_tokens for r in results if r.usage),
                  completion_tokens=sum(r.usage.completion_tokens for r in results if r.usage))
    sources = {r.score_source for r in results}
    return ScoreResult.model_construct(
        id=first.id, status=ResultStatus.OK, score=score, raw_score=raw_score,
        cached=all(r.cached for r in results), attempts=sum(r.attempts for r in results),
        latency_ms=max(r.latency_ms for r in results), usage=usage, error=None,
        score_source=sources.pop() if len(sources) == 1 else None,
        judges=[JudgeScore.model_construct(judge=label, score=s, raw_score=raw)
                for label, (s, raw) in zip(labels, pairs, strict=True)],
        agreement=top / len(pairs))
