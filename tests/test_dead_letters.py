"""Dead letters: the ``DeadLetters`` library on a real Redis, the ``rewardq failed`` CLI,
and the worker recording what fails for good (real worker processes and judge).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from scoring_data import expected, make_items

from rewardq.broker.app import QUEUE_JUDGE, TASK_SCORE_CHUNK, create_app
from rewardq.broker.dead_letters import DeadLetter, DeadLetters, LetterKind
from rewardq.broker.embedded import free_port
from rewardq.broker.errors import BrokerUnavailableError, DeadLetterNotFound
from rewardq.broker.keys import (
    DEAD_INDEX,
    DEAD_LETTERS_CLEARED,
    dead_fingerprint_key,
    dead_letter_key,
    judge_fingerprint,
)
from rewardq.broker.schemas import JudgeSpec, ResultStatus, ScoreItem
from rewardq.broker.settings import Settings
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess, settings_env

SPEC = JudgeSpec(model="rewardq-local-judge", prompt_version="v1").model_dump(mode="json")


@pytest.fixture
def letters(settings: Settings) -> Iterator[DeadLetters]:
    """``DeadLetters`` on this test's Redis database."""
    dead = DeadLetters.from_settings(settings)
    yield dead
    dead.close()


def item_letter(n: int, *, step: int | None = 3, failed_at: float | None = None,
                item: dict[str, Any] | None = None, reason: str = "failed",
                fingerprint: str | None = None) -> DeadLetter:
    """A dead letter for item ``n`` of a made-up chunk."""
    payload = item or make_items(n + 1, "dl")[n]
    return DeadLetter(id=f"job-0.{n}", kind=LetterKind.ITEM, reason=reason,
                      error="judge answered HTTP 500: boom", attempts=3, job_id="job",
                      chunk_index=0, position=n, item_id=payload.get("id"), step=step,
                      task_id="job-0", worker="w0@host", payload=payload, spec=SPEC,
                      fingerprint=fingerprint, received_at=time.time() - 1,
                      failed_at=failed_at or time.time() + n)


def queued_messages(settings: Settings) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message waiting on the judge queue."""
    client = redis.Redis.from_url(settings.broker_url)
    try:
        raw = client.lrange(QUEUE_JUDGE, 0, -1)
    finally:
        client.close()
    out = []
    for message in raw:
        envelope = json.loads(message)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        out.append((envelope["headers"]["task"], args))
    return out


def run_cli(settings: Settings, *argv: str,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``rewardq <argv>`` in a child process with ``settings`` in its environment."""
    return subprocess.run([sys.executable, "-m", "rewardq.cli", *argv],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=timeout)


def wait_for(condition: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"condition not met within {timeout}s")


# --- the library on a real Redis -------------------------------------------------------

def test_recorded_letters_list_newest_first_and_show_in_full(letters: DeadLetters) -> None:
    written = [item_letter(n) for n in range(3)]
    letters.record(written)

    listed = letters.list()

    assert [letter.id for letter in listed] == ["job-0.2", "job-0.1", "job-0.0"]
    assert letters.show("job-0.1") == written[1]
    assert [letter.id for letter in letters.list(limit=2)] == ["job-0.2", "job-0.1"]


def test_letters_are_kept_for_the_retention_period(letters: DeadLetters,
                                                   settings: Settings) -> None:
    ttl = settings.dead_letter_ttl_s
    stale = item_letter(0, failed_at=time.time() - ttl - 60)
    letters.record([stale])
    letters.record([item_letter(1)])  # every write trims index entries past retention
    client = redis.Redis.from_url(settings.broker_url)
    try:
        body_ttl = client.ttl(dead_letter_key("job-0.1"))
        index = {i.decode() for i in client.zrange(DEAD_INDEX, 0, -1)}
        client.delete(dead_letter_key("job-0.1"))  # as if its body had expired
        listed = letters.list()
        index_after = client.zcard(DEAD_INDEX)
    finally:
        client.close()

    assert ttl - 60 < body_ttl <= ttl
    assert index == {"job-0.1"}
    assert listed == [] and index_after == 0


def test_show_and_replay_of_an_unknown_id_raise_dead_letter_not_found(
        letters: DeadLetters, settings: Settings) -> None:
    letters.record([item_letter(0)])

    with pytest.raises(DeadLetterNotFound, match="'nope'"):
        letters.show("nope")
    with pytest.raises(DeadLetterNotFound, match="nothing was replayed"):
        letters.replay(["job-0.0", "nope"])
    assert [letter.id for letter in letters.list()] == ["job-0.0"]  # still there
    assert queued_messages(settings) == []


def test_replay_regroups_items_into_fresh_chunks_and_takes_the_letters_out(
        letters: DeadLetters, settings: Settings) -> None:
    small = settings.model_copy(update={"chunk_size": 2})
    dead = DeadLetters.from_settings(small)
    letters.record([item_letter(n) for n in range(3)] + [item_letter(3, step=4)])

    replay = dead.replay(["job-0.0", "job-0.1", "job-0.2", "job-0.3"])
    dead.close()
    sent = queued_messages(settings)

    assert sorted(replay.replayed) == ["job-0.0", "job-0.1", "job-0.2", "job-0.3"]
    assert replay.job_id.startswith("replay-") and len(replay.task_ids) == 3
    assert letters.list() == []
    chunks = [args[0] for name, args in sent if name == TASK_SCORE_CHUNK]
    assert len(chunks) == len(sent) == 3
    assert sorted(len(c["items"]) for c in chunks) == [1, 1, 2]  # step 3: 2 + 1, step 4: 1
    assert {c["step"] for c in chunks} == {3, 4}
    assert all(c["job_id"] == replay.job_id and c["spec"] == SPEC for c in chunks)
    assert all(c["deadline"] > time.time() + settings.chunk_deadline_s - 60 for c in chunks)
    assert sorted(i["id"] for c in chunks for i in c["items"]) == [f"dl-{n}" for n in range(4)]


def test_replaying_twice_sends_the_work_once(letters: DeadLetters, settings: Settings) -> None:
    letters.record([item_letter(n) for n in range(5)])

    first = letters.replay_all()
    second = letters.replay_all()

    assert len(first.replayed) == 5 and second.replayed == [] and second.task_ids == []
    with pytest.raises(DeadLetterNotFound, match="already replayed"):
        letters.replay(["job-0.1"])
    assert len(queued_messages(settings)) == 1


def test_purge_deletes_the_letters_given_or_all(letters: DeadLetters) -> None:
    letters.record([item_letter(n) for n in range(4)])

    one = letters.purge(["job-0.0"])
    rest = letters.purge()

    assert (one, rest) == (1, 3)
    assert letters.list() == [] and letters.count() == 0 and letters.purge() == 0


def test_a_verdict_for_the_same_work_clears_its_letters_and_counts_them(
        letters: DeadLetters, settings: Settings) -> None:
    letters.record([item_letter(0, fingerprint="f1"),
                    item_letter(1, reason="budget_exceeded", fingerprint="f1"),
                    item_letter(2, fingerprint="f2"), item_letter(3, fingerprint="f3"),
                    item_letter(4, reason="invalid")])
    client = redis.Redis.from_url(settings.broker_url)
    try:
        set_ttl = client.ttl(dead_fingerprint_key("f1"))
        letters.replay(["job-0.3"])  # taken out: its fingerprint set still names it

        cleared = letters.settle([], ["f1", "f3", "f9", "f1"])
        again = letters.settle([], ["f1"])
        left_sets = client.exists(dead_fingerprint_key("f1"), dead_fingerprint_key("f3"))
        left_bodies = client.exists(*(dead_letter_key(f"job-0.{n}") for n in (0, 1, 3)))
    finally:
        client.close()

    assert 0 < set_ttl <= settings.dead_letter_ttl_s
    assert (cleared, again) == (2, 0)  # the replayed letter is not counted
    assert left_sets == 0 and left_bodies == 0
    assert [letter.id for letter in letters.list()] == ["job-0.4", "job-0.2"]
    assert letters.count() == 2 and letters.cleared() == 2


def test_an_unreachable_redis_is_a_broker_unavailable_error() -> None:
    dead = DeadLetters.from_settings(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with pytest.raises(BrokerUnavailableError, match="dead letters unreachable"):
            dead.list()
    finally:
        dead.close()


# --- the CLI ---------------------------------------------------------------------------

def test_cli_lists_shows_and_reports_unknown_ids_without_a_traceback(
        letters: DeadLetters, settings: Settings) -> None:
    letters.record([item_letter(n) for n in range(2)])

    listed = run_cli(settings, "failed", "list")
    shown = run_cli(settings, "failed", "show", "job-0.1")
    missing = run_cli(settings, "failed", "show", "nope")
    replay_missing = run_cli(settings, "failed", "replay", "job-0.0", "nope")
    no_target = run_cli(settings, "failed", "replay")

    assert listed.returncode == 0, listed.stderr
    assert "job-0.0" in listed.stdout and "job-0.1" in listed.stdout
    assert "2 dead letter(s)" in listed.stdout and "HTTP 500" in listed.stdout
    assert shown.returncode == 0 and json.loads(shown.stdout)["item_id"] == "dl-1"
    for done in (missing, replay_missing):
        assert done.returncode == 1
        assert "error: no dead letter 'nope'" in done.stderr
        assert "Traceback" not in done.stderr
    assert "nothing was replayed" in replay_missing.stderr
    assert no_target.returncode == 2 and "Traceback" not in no_target.stderr
    assert len(letters.list()) == 2


def test_cli_says_so_when_redis_is_unreachable(settings: Settings) -> None:
    dead_redis = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})

    done = run_cli(dead_redis, "failed", "list")

    assert done.returncode == 1 and "error: dead letters unreachable" in done.stderr
    assert "Traceback" not in done.stderr


# --- the worker records, the operator replays (real processes) -------------------------

@pytest.mark.timeout(240)
def test_items_failing_for_good_are_dead_lettered_and_replay_scores_them_once_healed(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """Acceptance: judge failing every request -> ``failed`` + listed; healed -> replay
    --all scores them all and empties the list."""
    judge.configure(error_rate=1.0, error_kinds=["500"])
    workers(1, judge_max_attempts=2)
    items = make_items(24, "dead")
    with RewardClient(settings) as client:
        results = client.submit(items, step=11).result(timeout=120)

        listed = run_cli(settings, "failed", "list", "--json")
        letters = [json.loads(line) for line in listed.stdout.splitlines()]
        judge.configure(error_rate=0.0)
        judge.reset_stats()
        replayed = run_cli(settings, "failed", "replay", "--all", "--wait", "120")
        after = run_cli(settings, "failed", "list")
        again = run_cli(settings, "failed", "replay", "--all")
        calls = judge.stats()
        follow_up = client.submit(items)
        cached = follow_up.result(timeout=30)

    assert {r.status for r in results} == {ResultStatus.FAILED}
    assert all("HTTP 500" in (r.error or "") and r.attempts == 2 for r in results)
    assert listed.returncode == 0, listed.stderr
    assert sorted(letter["item_id"] for letter in letters) == sorted(i["id"] for i in items)
    assert all(letter["step"] == 11 and letter["reason"] == "failed" and
               letter["attempts"] == 2 and "HTTP 500" in letter["error"] for letter in letters)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "replayed 24 dead letter(s)" in replayed.stdout and "outcome: ok=24" in replayed.stdout
    assert after.stdout.strip() == "no dead letters"
    assert again.returncode == 0 and "nothing to replay" in again.stdout
    assert calls["requests_total"] == 24 and calls["max_ok_per_prompt"] == 1
    assert follow_up.chunk_count == 0
    assert [r.score for r in cached] == [expected(i)[0] for i in items]


@pytest.mark.timeout(180)
def test_a_replayed_item_that_fails_again_is_dead_lettered_again(
        settings: Settings, workers, judge: JudgeProcess, letters: DeadLetters) -> None:
    judge.configure(error_rate=1.0, error_kinds=["400"])
    workers(1)
    items = make_items(3, "twice")
    with RewardClient(settings) as client:
        results = client.score(items, timeout=60)
    first = letters.list()

    replay = letters.replay_all()
    counts = letters.outcome(replay, timeout_s=60)
    second = letters.list()

    assert all(r.status is ResultStatus.FAILED and r.attempts == 1 for r in results)
    assert len(first) == 3 and all("HTTP 400" in letter.error for letter in first)
    assert counts == {"failed": 3}
    assert len(second) == 3
    assert {letter.id for letter in second}.isdisjoint({letter.id for letter in first})
    assert all(letter.job_id == replay.job_id for letter in second)
    assert judge.stats()["requests_total"] == 6  # permanent: one call per item per run


@pytest.mark.timeout(180)
def test_an_item_scored_ok_later_clears_its_dead_letter(
        settings: Settings, workers, judge: JudgeProcess, letters: DeadLetters) -> None:
    """A failed item's letter goes once the same item is scored ok (a trainer or the
    gateway sending it again); the letter of an item not sent again stays."""
    judge.configure(error_rate=1.0, error_kinds=["400"])
    workers(1)
    healed, still_failed = make_items(2, "superseded")
    with RewardClient(settings) as client:
        failed = client.score([healed, still_failed], timeout=60)
        before = letters.list()
        judge.configure(error_rate=0.0)
        (again,) = client.score([healed], timeout=60)
    after = letters.list()
    by_item = {letter.item_id: letter for letter in before}
    sets = redis.Redis.from_url(settings.broker_url)
    try:
        counter = sets.get(DEAD_LETTERS_CLEARED)
        healed_set, kept_set = (sets.exists(dead_fingerprint_key(by_item[i["id"]].fingerprint))
                                for i in (healed, still_failed))
    finally:
        sets.close()

    assert [r.status for r in failed] == [ResultStatus.FAILED, ResultStatus.FAILED]
    assert sorted(by_item) == [healed["id"], still_failed["id"]]
    for letter in before:  # the fingerprint of the item as the worker received it
        assert letter.fingerprint == judge_fingerprint(
            JudgeSpec.model_validate(letter.spec), ScoreItem.model_validate(letter.payload))
    assert again.status is ResultStatus.OK and again.score == expected(healed)[0]
    assert [letter.item_id for letter in after] == [still_failed["id"]]
    assert letters.count() == 1 and (healed_set, kept_set) == (0, 1)
    assert int(counter) == 1 and letters.cleared() == 1


@pytest.mark.timeout(180)
def test_malformed_messages_are_dead_lettered_and_the_worker_scores_the_next(
        settings: Settings, workers, judge: JudgeProcess, letters: DeadLetters) -> None:
    """Acceptance: a malformed message is dead-lettered with its reason; the worker stays
    up and scores the next message. A bad item costs only itself."""
    (worker,) = workers(1)
    app = create_app(settings)
    good = make_items(2, "edge")
    mixed = {"job_id": "mixed", "chunk_index": 0, "step": 5, "spec": SPEC,
             "deadline": time.time() + 60,
             "items": [good[0], {"id": "bad", "prompt": "p", "response": 42}, good[1], 17]}
    try:
        app.send_task(TASK_SCORE_CHUNK, args=[{"junk": 1}], task_id="junk-1")
        app.send_task(TASK_SCORE_CHUNK, args=[{**mixed, "spec": {"model": ""}}],
                      task_id="bad-spec-1")
        app.send_task(TASK_SCORE_CHUNK, args=[mixed, "extra"], task_id="two-args-1")
        app.send_task("rewardq.no_such_task", args=[1], task_id="unknown-1",
                      queue=QUEUE_JUDGE)
        app.send_task(TASK_SCORE_CHUNK, args=[mixed], task_id="mixed-1")
        mixed_chunk = app.AsyncResult("mixed-1").get(timeout=60)
        wait_for(lambda: letters.count() >= 6)
    finally:
        app.close()
    with RewardClient(settings) as client:
        after = client.score(make_items(20, "next"), timeout=60)
    by_id = {letter.id: letter for letter in letters.list()}

    assert worker.poll() is None
    assert mixed_chunk["outcome"] == {"ok": 2, "invalid": 2}  # Flower's result column
    mixed_results = mixed_chunk["results"]
    assert [r["status"] for r in mixed_results] == ["ok", "invalid", "ok", "invalid"]
    assert [r["score"] for r in mixed_results[::2]] == [expected(i)[0] for i in good]
    assert "item 1 (id='bad')" in mixed_results[1]["error"]
    assert "'response'" in mixed_results[1]["error"]
    assert mixed_results[3]["id"] == "<item 3>"
    assert set(by_id) == {"junk-1", "bad-spec-1", "two-args-1", "unknown-1", "mixed-1.1",
                          "mixed-1.3"}
    assert by_id["junk-1"].reason == "malformed" and "'items'" in by_id["junk-1"].error
    assert by_id["junk-1"].payload == [{"junk": 1}]
    assert "'spec.model'" in by_id["bad-spec-1"].error
    assert "2 positional" in by_id["two-args-1"].error
    assert by_id["unknown-1"].reason == "unknown task"
    assert "rewardq.no_such_task" in by_id["unknown-1"].error
    assert by_id["mixed-1.1"].reason == "invalid" and by_id["mixed-1.1"].step == 5
    assert by_id["mixed-1.1"].payload == mixed["items"][1]
    assert all(r.status is ResultStatus.OK for r in after)


def test_cli_list_says_when_its_limit_cuts_the_listing(
        letters: DeadLetters, settings: Settings) -> None:
    letters.record([item_letter(n) for n in range(7)])
    cut = run_cli(settings, "failed", "list", "--limit", "5")
    whole = run_cli(settings, "failed", "list", "--limit", "0")
    assert cut.returncode == 0, cut.stderr
    assert "5 of 7 dead letter(s)" in cut.stdout and "--limit 0" in cut.stdout
    assert "7 dead letter(s)" in whole.stdout and " of " not in whole.stdout.splitlines()[-1]
