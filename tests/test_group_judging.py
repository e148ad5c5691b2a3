"""Group judging: GRPO groups judged listwise or pairwise (position swap), on real parts.

The fleet tests run two real ``celery -P gevent`` workers, a real Redis and the local
judge over HTTP. Each group's four items are shuffled into chunks of three, so a group's
members reach the fleet in different chunks and, as the group hashes in Redis show, on
different processes. The local judge grades every response by the per-item rule
(``rewardq.judge_server.grading``), so every score the fleet hands back is predicted here; its
configurable position bias (the response shown first wins a close pair) shows up when
each pair is asked in one order only, and is gone from the scores when both are asked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from itertools import permutations
from typing import Any

import httpx
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from rewardq.broker.errors import UnparseableReplyError
from rewardq.broker.keys import judge_fingerprint, judge_group_key, judge_group_lock_key
from rewardq.broker.schemas import GroupSpec, JudgeSpec, ResultStatus, ScoreItem, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.judge.group_prompts import (
    labels,
    listwise_messages,
    pairwise_messages,
    pairwise_request,
    parse_listwise,
    parse_pairwise,
    presentation_order,
)
from rewardq.judge.judge_core import judge_spec
from rewardq.judge.verdicts import normalize
from rewardq.judge_server.__main__ import add_arguments, config_from_args
from rewardq.judge_server.config import ConfigValueError, JudgeConfig
from rewardq.judge_server.dispatch import grade_request
from rewardq.judge_server.grading import expected_raw_score
from rewardq.judge_server.group_grading import bias_draw, pairwise_winner, parse_group_prompt
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess
from rewardq.workers.group_judging import pairwise_scores

GROUPS = 8
SIZE = 4


# -- data: what the local judge will say ---------------------------------------------------


def make_groups(tag: str, n_groups: int = GROUPS) -> list[list[dict[str, Any]]]:
    """``n_groups`` groups of ``SIZE`` distinct responses to one prompt each: even groups
    are graded against a reference (10 or 1, so ties abound), odd ones by the quality
    heuristic (grades 2-9)."""
    groups = []
    for g in range(n_groups):
        uid = f"{tag}-g{g}"
        if g % 2 == 0:
            a, b = 3 + g, 11 + 2 * g
            prompt, reference = f"[{tag}] What is {a} + {b}?", str(a + b)
            values = [a + b, a + b + 1 + g % 3, a + b, a + b - 1] if g % 4 == 0 \
                else [a + b, a + b, a + b, a + b + 2]
            responses = [f"Let me think ({k}). The answer is {v}." for k, v in
                         enumerate(values)]
        else:
            prompt, reference = f"[{tag}] Explain why the sky is blue (take {g}).", None
            responses = [
                "Rayleigh scattering.",
                f"Sunlight is scattered by air molecules, blue light the most ({g}).",
                f"Shorter wavelengths scatter more.\nSo blue light fills the sky ({g}).",
                f"The answer is: Rayleigh scattering of sunlight by about {g + 1} kinds "
                "of molecules.\nBlue scatters most, so the sky looks blue.",
            ]
        groups.append([{"id": f"{uid}-{k}", "prompt": prompt, "response": r,
                        "reference": reference, "uid": uid}
                       for k, r in enumerate(responses)])
    return groups


def grade(item: dict[str, Any]) -> int:
    return expected_raw_score(item["prompt"], item["response"], item.get("reference"))


def unbiased_pairwise(group: list[dict[str, Any]]) -> dict[str, float]:
    """Each member's share of wins when the higher grade wins and equal grades tie."""
    out = {}
    for item in group:
        mine = grade(item)
        points = sum(1.0 if mine > grade(o) else 0.5 if mine == grade(o) else 0.0
                     for o in group if o is not item)
        out[item["id"]] = points / (len(group) - 1)
    return out


def shuffled(groups: list[list[dict[str, Any]]], seed: int) -> list[dict[str, Any]]:
    items = [item for group in groups for item in group]
    random.Random(seed).shuffle(items)
    return items


def group_settings(settings: Settings, mode: str, **overrides: Any) -> Settings:
    return settings.model_copy(update={"judge_group_mode": mode, "judge_group_size": SIZE,
                                       "chunk_size": SIZE - 1, **overrides})


def worker_knobs(s: Settings, *more: str) -> dict[str, Any]:
    """What a test's worker processes take from ``s``: the group mode and size, and ``more``."""
    return {k: getattr(s, k) for k in ("judge_group_mode", "judge_group_size", *more)}


def score_on_two_workers(s: Settings, workers: Any, items: list[dict[str, Any]],
                         timeout: float) -> list[ScoreResult]:
    """``items`` scored as one step by two worker processes in ``s``'s group mode."""
    workers(2, **worker_knobs(s))
    started = time.perf_counter()
    with RewardClient(s) as client:
        results = client.submit(items, step=1).result(timeout=timeout)
    print(f"\n{s.judge_group_mode}: {GROUPS} groups of {SIZE} in chunks of {SIZE - 1}, "
          f"2 workers: {time.perf_counter() - started:.2f}s")
    return results


def joiners(settings: Settings, groups: list[list[dict[str, Any]]]) -> list[set[str]]:
    """Per group, the worker processes its members were brought to (from its hash)."""
    spec = judge_spec(settings)
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        return [{v.decode() for k, v in client.hgetall(judge_group_key(spec, g[0]["uid"]))
                 .items() if k.startswith(b"w:")} for g in groups]
    finally:
        client.close()


@pytest.fixture
def biased_judge(judge: JudgeProcess) -> Iterator[JudgeProcess]:
    """The shared judge, its position bias put back to none afterwards."""
    yield judge
    judge.configure(position_bias=0.0, position_bias_margin=0)


# -- the fleet -----------------------------------------------------------------------------


def test_listwise_scores_every_member_of_groups_spread_over_two_workers(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    s = group_settings(settings, "listwise")
    groups = make_groups("lw")
    items = shuffled(groups, seed=1)
    results = score_on_two_workers(s, workers, items, timeout=120)

    by_id = {r.id: r for r in results}
    for item in items:
        got = by_id[item["id"]]
        assert got.status is ResultStatus.OK, got
        assert got.raw_score == grade(item), got
        assert got.score == pytest.approx(normalize(grade(item)))
    stats = judge.stats()
    assert stats["requests_total"] == GROUPS  # one call per group, whoever made it
    assert stats["unique_prompts"] == GROUPS
    spread = joiners(s, groups)
    assert all(spread), spread
    assert len(set().union(*spread)) == 2, spread  # both processes held members
    assert any(len(p) == 2 for p in spread), spread  # and some group was split across them
    # the members' verdicts are cached: a resubmission makes no call
    with RewardClient(s) as client:
        again = client.submit(items, step=2).result(timeout=60)
    assert [(r.score, r.cached) for r in again] == [(r.score, True) for r in results]
    assert judge.stats()["requests_total"] == GROUPS


def test_pairwise_judges_both_orders_and_the_swap_removes_the_judges_position_bias(
        settings: Settings, workers, biased_judge: JudgeProcess) -> None:
    judge = biased_judge
    judge.configure(position_bias=1.0)  # every tied pair goes to whoever is shown first
    s = group_settings(settings, "pairwise")
    groups = make_groups("pw")
    items = shuffled(groups, seed=2)
    results = score_on_two_workers(s, workers, items, timeout=180)

    stats = judge.stats()
    ordered_pairs = GROUPS * SIZE * (SIZE - 1)
    assert stats["requests_total"] == ordered_pairs  # 96: each pair, in both orders,
    assert stats["unique_prompts"] == ordered_pairs  # every one a different prompt,
    assert stats["max_requests_per_prompt"] == 1    # asked once
    by_id = {r.id: r for r in results}
    ties = 0
    for group in groups:
        want = unbiased_pairwise(group)
        for item in group:
            got = by_id[item["id"]]
            assert got.status is ResultStatus.OK, got
            assert got.score == pytest.approx(want[item["id"]], abs=1e-9), (item, got)
            # both orders of a tied pair name their first response: disagreement
            tied = sum(grade(o) == grade(item) for o in group if o is not item)
            ties += tied
            assert got.agreement == pytest.approx(1 - tied / (SIZE - 1), abs=1e-9), got
    assert ties > 0  # the bias had pairs to act on
    spread = joiners(s, groups)
    assert any(len(p) == 2 for p in spread), spread

    # The same pairs in one order only (the shuffled presentation order, as a judge
    # without the swap would be asked): the first-shown wins every tie, so scores move.
    spec = judge_spec(s)
    one_order_moved = 0
    first_wins_on_ties = 0
    with httpx.Client(timeout=10) as http:
        for group in groups:
            order = presentation_order(judge_group_key(spec, group[0]["uid"]),
                                       [it["id"] for it in group])
            members = {it["id"]: it for it in group}
            points = dict.fromkeys(members, 0.0)
            for i, a in enumerate(order):
                for b in order[i + 1:]:
                    body = pairwise_request(spec, members[a]["prompt"],
                                            members[a]["reference"], members[a]["response"],
                                            members[b]["response"])
                    reply = http.post(f"{judge.base_url}/chat/completions", json=body).json()
                    winner = parse_pairwise(reply["choices"][0]["message"]["content"])
                    points[a] += {"A": 1.0, "tie": 0.5, "B": 0.0}[winner]
                    points[b] += {"B": 1.0, "tie": 0.5, "A": 0.0}[winner]
                    if grade(members[a]) == grade(members[b]):
                        first_wins_on_ties += winner == "A"
                        assert winner == "A"
            want = unbiased_pairwise(group)
            one_order_moved += sum(abs(points[m] / (SIZE - 1) - want[m]) > 1e-9
                                   for m in members)
    assert first_wins_on_ties == ties // 2  # every tied pair, counted once per pair
    assert one_order_moved > 0


def test_pairwise_without_bias_agrees_everywhere_and_identical_rollouts_tie(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    s = group_settings(settings, "pairwise")
    groups = make_groups("pw0", n_groups=2)
    # two rollouts of the second group wrote the same text: two members, one verdict
    groups[1][3]["response"] = groups[1][2]["response"]
    workers(1, **worker_knobs(s))
    with RewardClient(s) as client:
        results = client.submit(shuffled(groups, seed=3), step=1).result(timeout=120)
    by_id = {r.id: r for r in results}
    for group in groups:
        want = unbiased_pairwise(group)
        for item in group:
            got = by_id[item["id"]]
            assert got.status is ResultStatus.OK and got.agreement == 1.0, got
            assert got.score == pytest.approx(want[item["id"]], abs=1e-9)
    assert by_id[groups[1][3]["id"]].score == by_id[groups[1][2]["id"]].score
    # 12 ordered pairs for the first group, 6 for the second's 3 distinct texts
    assert judge.stats()["requests_total"] == SIZE * (SIZE - 1) + 3 * 2


def test_an_incomplete_group_times_out_and_uidless_and_late_items_are_invalid(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    s = group_settings(settings, "listwise", chunk_deadline_s=4.0)
    complete, partial = make_groups("inc", n_groups=2)
    lone = {"id": "no-uid", "prompt": "What is 1 + 1?", "response": "The answer is 2."}
    workers(1, **worker_knobs(s, "chunk_deadline_s"))
    with RewardClient(s) as client:
        results = client.submit([*partial[:3], lone, *complete], step=1).result(timeout=60)

    by_id = {r.id: r for r in results}
    for item in partial[:3]:
        got = by_id[item["id"]]
        assert got.status is ResultStatus.TIMEOUT and got.score is None, got
        assert "3 of 4 members" in (got.error or ""), got
    assert by_id["no-uid"].status is ResultStatus.INVALID
    assert "uid" in (by_id["no-uid"].error or "")
    assert all(by_id[i["id"]].status is ResultStatus.OK for i in complete)
    assert judge.stats()["requests_total"] == 1

    # a fifth member of the complete group, after it was judged: refused, not re-judged
    late = {**complete[0], "id": "late", "response": "The answer is: something else."}
    with RewardClient(s) as client:
        (got,) = client.submit([late], step=2).result(timeout=60)
    assert got.status is ResultStatus.INVALID and "already complete" in (got.error or "")
    assert judge.stats()["requests_total"] == 1


def test_a_group_whose_owner_is_killed_mid_call_is_taken_over(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """SIGKILL the process holding a group's lease while its call is at the judge: the
    lease lapses, another process takes the group over, every member is scored."""
    s = group_settings(settings, "listwise", inflight_lock_ttl_s=2.0, chunk_lease_s=3.0)
    judge.configure(latency_ms=3000)
    (group,) = make_groups("kill", n_groups=1)
    procs = workers(2, **worker_knobs(s, "inflight_lock_ttl_s", "chunk_lease_s"))
    lease = judge_group_lock_key(judge_group_key(judge_spec(s), group[0]["uid"]))
    client_redis = redis.Redis.from_url(s.redis_url or "")
    with RewardClient(s) as client:
        pending = client.submit(shuffled([group], seed=4), step=1)
        deadline = time.monotonic() + 60
        while (token := client_redis.get(lease)) is None:
            assert time.monotonic() < deadline, "nobody took the group's lease"
            time.sleep(0.01)
        owner_pid = int(token.decode().split("/")[0].rsplit(":", 1)[1])
        while judge.stats()["requests_total"] < 1:  # its call is at the judge
            assert time.monotonic() < deadline, "the group's owner made no call"
            time.sleep(0.01)
        victim = next(p for p in procs if p.pid == owner_pid)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        judge.configure(latency_ms=0)
        results = pending.result(timeout=120)
    print(f"\nowner SIGKILLed mid-call -> every member scored: "
          f"{time.perf_counter() - killed_at:.1f}s (lease 2 s, chunk lease 3 s), "
          f"judge calls: {judge.stats()['requests_total']}")
    client_redis.close()

    assert victim.wait(10) == -signal.SIGKILL
    for item, got in zip(sorted(group, key=lambda i: i["id"]),
                         sorted(results, key=lambda r: r.id), strict=True):
        assert got.status is ResultStatus.OK, got
        assert got.raw_score == grade(item)
    assert judge.stats()["requests_total"] >= 2  # the dead owner's call, and the new one


# -- pure parts: prompts, replies, tallies, the local judge's rules -----------------------


def test_labels_run_past_z() -> None:
    assert labels(3) == ["A", "B", "C"]
    assert labels(28)[25:] == ["Z", "AA", "AB"]
    assert len(set(labels(64))) == 64


@pytest.mark.parametrize("content", [
    '{"scores": {"A": 7, "B": 3, "C": 10}}',
    'Here you go:\n```json\n{"scores": {"a": "7", " B ": 3.0, "C": 12}, "reason": "x"}\n```',
    '{"scores": {"A": 7, "B": 3, "C": 10, "D": 5}, "reason": "an extra label is ignored"}',
])
def test_parse_listwise_reads_a_score_per_label(content: str) -> None:
    assert parse_listwise(content, ["A", "B", "C"]) == {"A": 7.0, "B": 3.0, "C": 10.0}


@pytest.mark.parametrize("content", [
    None, "", "7, 3, 10", '{"score": 7}', '{"scores": [7, 3, 10]}',
    '{"scores": {"A": 7, "B": 3}}', '{"scores": {"A": 7, "B": "high", "C": 1}}',
    '{"scores": {"A": 7, "B": NaN, "C": 1}}', '{"scores": {"A": true, "B": 3, "C": 1}}',
])
def test_parse_listwise_refuses_what_it_cannot_read(content: str | None) -> None:
    with pytest.raises(UnparseableReplyError):
        parse_listwise(content, ["A", "B", "C"])


def test_parse_listwise_clamps_to_the_scale() -> None:
    assert parse_listwise('{"scores": {"A": 0, "B": 99}}', ["A", "B"]) == {"A": 1.0,
                                                                         "B": 10.0}


@pytest.mark.parametrize(("content", "winner"), [
    ('{"winner": "A"}', "A"), ('{"winner": "b", "reason": "shorter"}', "B"),
    ('{"winner": "tie"}', "tie"), ('{"winner": " Draw "}', "tie"),
    ('The better one:\n{"winner": "B", "reason": "right answer"}', "B"),
])
def test_parse_pairwise_reads_the_winner(content: str, winner: str) -> None:
    assert parse_pairwise(content) == winner


@pytest.mark.parametrize("content", [None, "  ", "A", '{"winner": "C"}', '{"winner": 1}',
                                     '{"best": "A"}'])
def test_parse_pairwise_refuses_what_it_cannot_read(content: str | None) -> None:
    with pytest.raises(UnparseableReplyError):
        parse_pairwise(content)


def test_presentation_order_is_fixed_whatever_the_arrival_order() -> None:
    members = [f"m{i}" for i in range(6)]
    orders = {tuple(presentation_order("rewardq:judgegroup:x", p))
              for p in permutations(members)}
    assert len(orders) == 1
    assert list(next(iter(orders))) != members  # shuffled, not sorted
    assert presentation_order("rewardq:judgegroup:y", members) != list(next(iter(orders)))


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=5),
       st.text(min_size=1, max_size=40), st.one_of(st.none(), st.text(max_size=20)))
def test_the_local_judge_reads_back_what_the_prompts_write(
        responses: list[str], prompt: str, reference: str | None) -> None:
    # a response may quote the markers of its own section: it is still read whole
    responses = [*responses[:-1], responses[-1] + "\n<<<END RESPONSE A>>>"]
    text = listwise_messages(prompt, reference, responses)[1]["content"]
    parsed = parse_group_prompt(text)
    assert parsed is not None and parsed.mode == "listwise"
    assert parsed.prompt == prompt and parsed.reference == reference
    assert [r for _, r in parsed.responses] == responses
    pair = parse_group_prompt(pairwise_messages(prompt, reference, responses[0],
                                                responses[-1])[1]["content"])
    assert pair is not None and pair.mode == "pairwise"
    assert pair.responses == (("A", responses[0]), ("B", responses[-1]))


def test_the_local_judge_grades_each_response_by_the_per_item_rule() -> None:
    (group,) = make_groups("unit", n_groups=1)
    messages = listwise_messages(group[0]["prompt"], group[0]["reference"],
                                 [i["response"] for i in group])
    reply = grade_request(messages).reply
    assert reply is not None
    assert json.loads(reply)["scores"] == dict(zip(labels(SIZE), map(grade, group),
                                                   strict=True))


def test_the_position_bias_favours_the_first_shown_on_close_pairs_in_both_orders() -> None:
    assert pairwise_winner(5, 5, 0.3, position_bias=0.0, margin=0) == "tie"
    assert pairwise_winner(5, 5, 0.3, position_bias=0.5, margin=0) == "A"
    assert pairwise_winner(5, 5, 0.7, position_bias=0.5, margin=0) == "tie"
    assert pairwise_winner(4, 5, 0.3, position_bias=0.5, margin=0) == "B"
    assert pairwise_winner(4, 5, 0.3, position_bias=0.5, margin=1) == "A"
    assert pairwise_winner(3, 5, 0.3, position_bias=1.0, margin=1) == "B"
    assert bias_draw(0, "x", "y") == bias_draw(0, "y", "x") != bias_draw(1, "x", "y")
    # over many tied pairs, about position_bias of them are biased (the draw is uniform)
    draws = [bias_draw(0, f"r{i}", f"s{i}") for i in range(2000)]
    assert 0.45 < sum(d < 0.5 for d in draws) / len(draws) < 0.55
    config = JudgeConfig(position_bias=1.0)
    spec = JudgeSpec(model="m", prompt_version="v1")
    for first, second in (("The answer is 4.", "So \\boxed{4}"),
                          ("So \\boxed{4}", "The answer is 4.")):
        body = pairwise_request(spec, "What is 2 + 2?", "4", first, second)
        assert json.loads(grade_request(body["messages"], config).reply or "")["winner"] == "A"
        assert json.loads(grade_request(body["messages"]).reply or "")["winner"] == "tie"
    with pytest.raises(ConfigValueError):
        JudgeConfig(position_bias=1.5)
    with pytest.raises(ConfigValueError):
        JudgeConfig().updated({"position_bias_margin": -1})


def test_the_position_bias_flags_set_the_judges_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--position-bias", "0.25",
                                                 "--position-bias-margin", "1"]))
    assert (config.position_bias, config.position_bias_margin) == (0.25, 1)
    assert config_from_args(parser.parse_args([])).position_bias == 0.0


def test_pairwise_scores_with_the_swap_cancel_a_first_position_bias() -> None:
    grades = {"a": 9, "b": 9, "c": 4, "d": 1}
    # a judge that always names the first response on a tie, else the higher grade
    winners = {(x, y): "A" if grades[x] >= grades[y] else "B"
               for x in grades for y in grades if x != y}
    got = pairwise_scores(dict.fromkeys(grades, 1), winners)
    assert {m: s.score for m, s in got.items()} == {"a": 2.5 / 3, "b": 2.5 / 3, "c": 1 / 3,
                                                    "d": 0.0}
    assert {m: s.agreement for m, s in got.items()} == {"a": 2 / 3, "b": 2 / 3, "c": 1.0,
                                                        "d": 1.0}
    assert got["a"].points == 5.0


def test_pairwise_scores_count_identical_rollouts_as_tied_members() -> None:
    # "x" was written by two rollouts: the group has 3 members, "x" twice
    winners = {("x", "y"): "A", ("y", "x"): "B"}
    got = pairwise_scores({"x": 2, "y": 1}, winners)
    assert got["x"].score == pytest.approx((2 + 1) / 4)  # beats y twice, ties its twin
    assert got["y"].score == 0.0
    assert got["x"].agreement == got["y"].agreement == 1.0


def test_group_cache_keys_carry_the_group_and_the_uid() -> None:
    item = ScoreItem(id="1", prompt="p", response="r", uid="u1")
    single = JudgeSpec(model="m", prompt_version="v1")
    listwise = single.model_copy(update={"group": GroupSpec(mode="listwise", size=4)})
    pairwise = single.model_copy(update={"group": GroupSpec(mode="pairwise", size=4)})
    keys = {judge_fingerprint(single, item), judge_fingerprint(listwise, item),
            judge_fingerprint(pairwise, item),
            judge_fingerprint(listwise, item.model_copy(update={"uid": "u2"}))}
    assert len(keys) == 4
    # a single item's key ignores the uid, as it always did
    assert judge_fingerprint(single, item) == judge_fingerprint(
        single, item.model_copy(update={"uid": None}))
    assert judge_group_key(listwise, "u1") != judge_group_key(pairwise, "u1")
