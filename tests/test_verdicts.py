"""The judge-reply parser (``rewardq.judge.verdicts``): known reply shapes and a fuzz.

The contract a worker relies on: for any reply text, ``extract_raw_score`` returns a
finite float or raises ``UnparseableReplyError`` (which the retry policy understands) and
nothing else, and ``normalize`` of what it returns lies in [0, 1].
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rewardq.broker.errors import UnparseableReplyError
from rewardq.judge.verdicts import extract_raw_score, normalize


@pytest.mark.parametrize(("reply", "raw"), [
    ('{"score": 7, "reason": "right answer, clumsy"}', 7.0),
    ('{"score": 8.5}', 8.5),
    ('{"score": "6"}', 6.0),
    ('{"score": " 9 "}', 9.0),
    ('```json\n{"score": 4, "reason": "wrong"}\n```', 4.0),
    ('Sure! Here is my grade:\n{"score": 10, "reason": "matches"}\nHope it helps.', 10.0),
    ('{"reason": "no score key"} but I would say 3', 3.0),
    ("7", 7.0),
    ("Score: 5/10", 5.0),
    ("  -2  ", -2.0),
    ('{"score": 12}', 12.0),
])
def test_known_reply_shapes(reply: str, raw: float) -> None:
    assert extract_raw_score(reply) == raw


@pytest.mark.parametrize("reply", [None, "", "   \n", "I cannot grade this response.",
                                   '{"score": null}', '{"score": true}', '{"score": "high"}'])
def test_replies_without_a_score_are_unparseable(reply: str | None) -> None:
    with pytest.raises(UnparseableReplyError):
        extract_raw_score(reply)


@pytest.mark.parametrize(("raw", "score"), [(1, 0.0), (10, 1.0), (5.5, 0.5), (-3, 0.0),
                                            (12, 1.0), (1e300, 1.0), (-math.inf, 0.0)])
def test_normalize_clamps_to_the_scale(raw: float, score: float) -> None:
    assert normalize(raw) == score


def _assert_contract(reply: str) -> None:
    try:
        raw = extract_raw_score(reply)
    except UnparseableReplyError:
        return
    assert math.isfinite(raw)
    assert 0.0 <= normalize(raw) <= 1.0


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12),
                          st.floats(allow_nan=True, allow_infinity=True))
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


@given(st.text(max_size=300))
@example("{" * 500)
@example("[" * 5000 + "]" * 5000)
@example('{"score": ' + "[" * 3000 + "]" * 3000 + "}")
@example("9" * 400)
@example('{"score": "1e999"}')
@example('{"score": NaN}')
def test_any_text_gives_a_finite_score_or_unparseable(reply: str) -> None:
    _assert_contract(reply)


@given(score=_json_values, extra=st.dictionaries(st.text(max_size=6), _json_values,
                                                 max_size=3),
       before=st.sampled_from(["", "Here you go:\n", "```json\n", "Grade 3 of 4: "]),
       after=st.sampled_from(["", "\n```", " Thanks.", " (7)"]))
def test_json_replies_in_any_wrapping_keep_the_contract(score: object, extra: dict[str, object],
                                                        before: str, after: str) -> None:
    body = json.dumps({**extra, "score": score})

    _assert_contract(before + body + after)


@given(score=st.integers(1, 10) | st.floats(1, 10, allow_nan=False),
       before=st.sampled_from(["", "```json\n", "My verdict: ", "Some prose {not json} "]),
       after=st.sampled_from(["", "\n```", " That is all.", "\n{\"score\": 2}"]))
def test_the_first_json_score_is_the_one_read(score: float, before: str, after: str) -> None:
    reply = before + json.dumps({"score": score, "reason": "because"}) + after

    assert extract_raw_score(reply) == float(score)
    assert normalize(extract_raw_score(reply)) == pytest.approx((score - 1) / 9)


@pytest.mark.parametrize("reply", ['{"score": 1' + "0" * 400 + "}", '{"score": 1e400}',
                                   '{"score": [1]}', '{"score": null}', '{"score": true}',
                                   "score: 1e400"])
def test_a_score_that_is_no_finite_number_is_unparseable(reply: str) -> None:
    with pytest.raises(UnparseableReplyError):
        extract_raw_score(reply)
