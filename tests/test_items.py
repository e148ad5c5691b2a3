"""Validation at the edge: bad items are refused with the item and field named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewardq.broker.errors import InvalidItemError
from rewardq.broker.schemas import MAX_TEXT_CHARS, ScoreItem, parse_items
from rewardq.broker.settings import Settings
from rewardq.producer.client import RewardClient

GOOD = {"id": "a", "prompt": "What is 2+2?", "response": "4", "reference": "4"}


@pytest.mark.parametrize(("bad", "field", "words"), [
    ({k: v for k, v in GOOD.items() if k != "response"}, "response", "required"),
    ({**GOOD, "prompt": ""}, "prompt", "at least 1 character"),
    ({**GOOD, "prompt": "x" * (MAX_TEXT_CHARS + 1)}, "prompt", f"at most {MAX_TEXT_CHARS}"),
    ({**GOOD, "response": 4}, "response", "valid string"),
    ({**GOOD, "uid": 3}, "uid", "valid string"),
    ({**GOOD, "metadata": "x"}, "metadata", "dictionary"),
    ({**GOOD, "colour": "red"}, "colour", "not permitted"),
])
def test_a_bad_item_is_named_with_its_field(bad: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidItemError) as err:
        parse_items([GOOD, bad])
    message = str(err.value)
    assert "item 1" in message and f"'{field}'" in message and words in message
    assert "item 0" not in message


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidItemError) as err:
        parse_items([{"id": "x"}, 7, GOOD, {**GOOD, "id": ""}])
    assert len(err.value.problems) == 4  # prompt, response, not-an-object, empty id
    assert "item 1: expected a JSON object" in str(err.value)


def test_submit_refuses_a_bad_batch_before_enqueueing_anything(settings: Settings) -> None:
    with RewardClient(settings) as client, pytest.raises(InvalidItemError, match="item 1"):
        client.submit([GOOD, {**GOOD, "prompt": ""}])
    import redis
    assert redis.Redis.from_url(settings.broker_url).llen("rewardq.judge") == 0


def test_submit_command_names_line_id_and_field(tmp_path: Path) -> None:
    src = tmp_path / "items.jsonl"
    src.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "b", "response": 4})
                   + "\n{not json\n")
    done = subprocess.run([sys.executable, "-m", "rewardq.cli", "submit", str(src)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "line 3 (id='b'): field 'response'" in done.stderr
    assert "line 4: not valid JSON" in done.stderr


@given(st.dictionaries(st.sampled_from(list(ScoreItem.model_fields) + ["junk"]),
                       st.one_of(st.none(), st.text(max_size=5), st.integers(),
                                 st.lists(st.integers(), max_size=2))))
def test_parse_items_either_accepts_or_explains(raw: dict) -> None:
    try:
        [item] = parse_items([raw])
    except InvalidItemError as exc:
        assert exc.problems and all(p.startswith("item 0") for p in exc.problems)
    else:
        assert item.id == raw["id"] and item.response == raw["response"]


def test_an_unserializable_item_late_in_the_batch_fails_before_any_chunk_is_sent(
        settings: Settings) -> None:
    items = [{**GOOD, "id": f"i{n}"} for n in range(100)]
    items[99] = {**items[99], "metadata": {"tensor": object()}}
    with RewardClient(settings.model_copy(update={"chunk_size": 10})) as client, \
            pytest.raises(InvalidItemError, match=r"item 99 \(id='i99'\): field 'metadata'"):
        client.submit(items)
    import redis
    assert redis.Redis.from_url(settings.broker_url).llen("rewardq.judge") == 0
