"""Ensembles: K judges per item, aggregated, with each judge's score and the agreement
(issue 13, item 4). The local judge plays three judges that disagree by fixed offsets."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
from scoring_data import make_items

from rewardq.broker.errors import ConfigError
from rewardq.broker.schemas import JudgeSpec, JudgeVerdict, ResultStatus, ScoreResult, Usage
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import judge_spec
from rewardq.judge.verdicts import normalize
from rewardq.judge_server.grading import expected_raw_score
from rewardq.producer.client import RewardClient
from rewardq.producer.sync_judge import SyncJudge
from rewardq.stack import JudgeProcess
from rewardq.workers.ensembles import aggregate, ensemble_members

OFFSETS = {"judge-lenient": 2, "judge-harsh": -3}
JUDGES = ["rewardq-local-judge", "judge-lenient", "judge-harsh"]


def raw_by(judge: str, item: dict[str, str]) -> float:
    base = expected_raw_score(item["prompt"], item["response"], item.get("reference"))
    return float(min(max(base + OFFSETS.get(judge, 0), 1), 10))


def ok(item_id: str, raw: float, *, cached: bool = False) -> ScoreResult:
    return ScoreResult.from_verdict(item_id, _verdict(raw), cached=cached, attempts=1)


def _verdict(raw: float) -> JudgeVerdict:
    return JudgeVerdict(score=normalize(raw), raw_score=raw,
                        usage=Usage(prompt_tokens=10, completion_tokens=2))


# ------------------------------------------------------------------------------ units

def test_members_are_one_call_kind_per_judge_and_sample() -> None:
    spec = JudgeSpec(model="m", prompt_version="v1", judges=("a", "b"), samples=2,
                     temperature=0.7)
    members = ensemble_members(spec)
    assert [(label, s.model, suffix) for label, s, suffix in members] == [
        ("a", "a", ""), ("a#1", "a", "#1"), ("b", "b", ""), ("b#1", "b", "#1")]
    assert all(s.judges == () and s.samples == 1 for _, s, _ in members)
    plain = JudgeSpec(model="m", prompt_version="v1")
    assert ensemble_members(plain) == [("m", plain, "")]


def test_mean_and_majority_with_agreement() -> None:
    results = [ok("x", 7), ok("x", 7, cached=True), ok("x", 4)]
    mean = aggregate("mean", ["a", "b", "c"], results)
    assert mean.status is ResultStatus.OK
    assert mean.raw_score == pytest.approx(6.0)
    assert mean.score == pytest.approx(statistics.mean(normalize(r) for r in (7, 7, 4)))
    assert mean.agreement == pytest.approx(2 / 3)
    assert [(j.judge, j.raw_score) for j in mean.judges or []] == [("a", 7), ("b", 7), ("c", 4)]
    assert not mean.cached and mean.attempts == 3
    assert mean.usage is not None and mean.usage.prompt_tokens == 30
    majority = aggregate("majority", ["a", "b", "c"], results)
    assert (majority.raw_score, majority.score) == (7, normalize(7))
    tie = aggregate("majority", ["a", "b"], [ok("x", 9), ok("x", 3)])
    assert tie.raw_score == 3 and tie.agreement == 0.5  # a contested reward errs low


def test_a_failed_member_fails_the_item_naming_the_judge() -> None:
    failed = ScoreResult.failure("x", ResultStatus.FAILED, "judge answered HTTP 400: no")
    result = aggregate("mean", ["a", "b"], [ok("x", 7), failed])
    assert result.status is ResultStatus.FAILED and result.score is None
    assert result.error == "judge b: judge answered HTTP 400: no"


# ------------------------------------------------------------------------------ fleet

def test_an_ensemble_of_three_judges_on_the_fleet(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    judge.configure(model_offsets=OFFSETS)
    run = settings.model_copy(update={"judge_ensemble": JUDGES, "chunk_size": 16})
    items = make_items(40, "ens")
    batch = items + items[:10]  # duplicates: judged once per judge
    workers(2)
    with RewardClient(run) as client:
        results = client.submit(batch, step=1).result(timeout=120)

    assert judge.stats()["requests_total"] == len(items) * len(JUDGES)
    models = Counter(r["model"] for r in judge.requests())
    assert models == {j: len(items) for j in JUDGES}
    for item, result in zip(batch, results, strict=True):
        raws = [raw_by(j, item) for j in JUDGES]
        assert result.status is ResultStatus.OK, result
        got = [(s.judge, s.raw_score) for s in result.judges or []]
        assert got == list(zip(JUDGES, raws, strict=True))
        assert result.raw_score == pytest.approx(statistics.mean(raws))
        assert result.score == pytest.approx(statistics.mean(normalize(r) for r in raws))
        assert result.agreement == pytest.approx(max(Counter(raws).values()) / len(raws))

    # Cache per (judge, item): a smaller ensemble, and one judge alone, call nobody.
    judge.reset_stats()
    pair = run.model_copy(update={"judge_ensemble": JUDGES[:2], "judge_aggregate": "majority"})
    solo = settings.model_copy(update={"judge_model": "judge-harsh"})
    with RewardClient(pair) as client:
        again = client.submit(items, step=2).result(timeout=120)
    with RewardClient(solo) as client:
        alone = client.submit(items, step=3).result(timeout=120)
    assert judge.stats()["requests_total"] == 0
    assert all(r.status is ResultStatus.OK and r.cached for r in again + alone)
    for item, two, one in zip(items, again, alone, strict=True):
        assert len(two.judges or []) == 2
        assert one.raw_score == raw_by("judge-harsh", item) and one.judges is None


def test_ensemble_settings_reach_the_spec(settings: Settings) -> None:
    spec = judge_spec(settings.model_copy(update={
        "judge_ensemble": JUDGES, "judge_samples": 2, "judge_aggregate": "majority"}))
    assert (spec.judges, spec.samples, spec.aggregate) == (tuple(JUDGES), 2, "majority")


@pytest.mark.parametrize("update", [{"judge_ensemble": JUDGES}, {"judge_samples": 3},
                                    {"judge_group_mode": "pairwise"}])
def test_the_sync_judge_refuses_what_only_the_fleet_does(
        settings: Settings, update: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="need the worker fleet"):
        SyncJudge(settings.model_copy(update=update))
