"""Length penalties in torch against the plain-Python reference, and the config's rules."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from rewardq.producer.config import LengthPenaltyConfig
from rewardq.producer.penalties import (
    group_ids,
    group_median_penalty,
    group_medians,
    length_penalty,
    overlong_penalty,
    place_at_last_token,
    response_lengths,
)

try:
    from tests import penalty_reference as ref
except ImportError:  # pytest put tests/ itself, not the repository root, on sys.path
    import penalty_reference as ref  # type: ignore[no-redef]

TOL = 1e-5
PROPERTY = settings(max_examples=150, deadline=None)


def assert_matches(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == (len(expected),)
    for i, (a, e) in enumerate(zip(actual.tolist(), expected, strict=True)):
        assert math.isclose(a, e, rel_tol=TOL, abs_tol=TOL), f"sample {i}: torch {a} != ref {e}"


def penalties(lengths: list[int], uids: list[object | None] | None, **cfg: Any) -> list[float]:
    return length_penalty(torch.tensor(lengths), uids, LengthPenaltyConfig(**cfg)).tolist()


# --- strategies ---------------------------------------------------------------------------

uid_values = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 3))


@st.composite
def group_median_configs(draw: st.DrawFn) -> LengthPenaltyConfig:
    peak = draw(st.floats(0.0, 0.95))
    outer = draw(st.floats(peak, 0.999, exclude_min=True))
    return LengthPenaltyConfig(
        peak_ratio=peak,
        outer_ratio=outer,
        max_penalty=draw(st.floats(0.0, 10.0)),
        penalty_scale=draw(st.floats(0.0, 10.0)),
    )


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[int], list[object | None]]:
    size = draw(st.integers(1, 48))
    # Lengths from a narrow range now and then, so groups land on the band edges and ramps.
    high = draw(st.sampled_from([3, 40, 300, 5000]))
    lengths = draw(st.lists(st.integers(0, high), min_size=size, max_size=size))
    uids: list[object | None] = draw(st.lists(uid_values, min_size=size, max_size=size))
    return lengths, uids


# --- properties: torch == reference -------------------------------------------------------


@PROPERTY
@given(batch=batches(), cfg=group_median_configs())
def test_group_median_penalty_matches_reference(
    batch: tuple[list[int], list[object | None]], cfg: LengthPenaltyConfig
) -> None:
    lengths, uids = batch
    actual = length_penalty(torch.tensor(lengths), uids, cfg)
    assert_matches(actual, ref.length_penalties(lengths, uids, cfg))
    assert bool((actual >= 0).all())
    assert bool((actual <= cfg.max_penalty * (1 + TOL)).all())


@PROPERTY
@given(batch=batches())
def test_group_medians_equal_statistics_median(
    batch: tuple[list[int], list[object | None]],
) -> None:
    lengths, uids = batch
    medians = group_medians(torch.tensor(lengths), group_ids(uids))
    assert medians.tolist() == ref.group_medians(lengths, uids)


@PROPERTY
@given(
    lengths=st.lists(st.integers(0, 600), min_size=1, max_size=48),
    max_resp_len=st.integers(1, 512),
    buffer_frac=st.floats(0.0, 1.0, exclude_min=True),
    factor=st.floats(0.0, 10.0),
)
def test_overlong_penalty_matches_reference(
    lengths: list[int], max_resp_len: int, buffer_frac: float, factor: float
) -> None:
    buffer_len = max(1, round(buffer_frac * max_resp_len))
    cfg = LengthPenaltyConfig(
        penalty_shape="overlong",
        max_resp_len=max_resp_len,
        overlong_buffer_len=buffer_len,
        overlong_penalty_factor=factor,
    )
    term = overlong_penalty(torch.tensor(lengths), max_resp_len, buffer_len, factor)
    assert_matches(term, [ref.overlong_term(n, max_resp_len, buffer_len, factor) for n in lengths])
    assert_matches(
        length_penalty(torch.tensor(lengths), None, cfg), ref.length_penalties(lengths, None, cfg)
    )


@PROPERTY
@given(
    rows=st.lists(st.lists(st.integers(0, 1), min_size=12, max_size=12), min_size=1, max_size=16),
    prompt_len=st.integers(0, 12),
)
def test_response_lengths_match_reference(rows: list[list[int]], prompt_len: int) -> None:
    actual = response_lengths(torch.tensor(rows), prompt_len)
    assert actual.dtype == torch.long
    assert actual.tolist() == [ref.response_length(row, prompt_len) for row in rows]


@PROPERTY
@given(
    data=st.data(),
    width=st.integers(1, 16),
    batch=st.integers(0, 16),
)
def test_place_at_last_token_matches_reference(data: st.DataObject, width: int, batch: int) -> None:
    lengths = data.draw(st.lists(st.integers(0, width), min_size=batch, max_size=batch))
    scores = data.draw(st.lists(st.floats(-100, 100, width=32), min_size=batch, max_size=batch))
    out = place_at_last_token(torch.tensor(scores), torch.tensor(lengths), (batch, width))
    assert out.dtype == torch.float32
    assert out.tolist() == ref.reward_rows(scores, lengths, width)


# --- group medians ------------------------------------------------------------------------


def test_odd_group_takes_the_middle_value() -> None:
    medians = group_medians(torch.tensor([9, 1, 5]), torch.tensor([0, 0, 0]))
    assert medians.tolist() == [5.0, 5.0, 5.0]


def test_even_group_takes_the_mean_of_the_two_middles_not_torch_lower_median() -> None:
    lengths = torch.tensor([7, 3, 100, 5])
    assert torch.median(lengths).item() == 5  # the lower middle, what torch would give
    medians = group_medians(lengths, torch.zeros(4, dtype=torch.long))
    assert medians.tolist() == [6.0] * 4
    # M = 6: band [4.2, 7.8], L = 3 is at M(1-o). The lower median 5 would give 0.5 twice.
    assert penalties([7, 3, 100, 5], ["g"] * 4) == pytest.approx([0.0, 1.0, 1.0, 0.0])
    lower = group_median_penalty(lengths, torch.full((4,), 5.0), LengthPenaltyConfig())
    assert lower.tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0])


def test_odd_sum_even_group_median_is_a_half() -> None:
    medians = group_medians(torch.tensor([3, 4]), torch.tensor([5, 5]))
    assert medians.tolist() == [3.5, 3.5]


def test_groups_are_independent_and_need_not_be_dense() -> None:
    lengths = torch.tensor([10, 30, 20, 1000, 7])
    medians = group_medians(lengths, torch.tensor([7, 7, 7, -3, 99]))
    assert medians.tolist() == [20.0, 20.0, 20.0, 1000.0, 7.0]


def test_float_lengths_and_huge_integer_ranges_take_the_stable_sort_path() -> None:
    groups = torch.tensor([0, 1, 0, 1, 0, 2])
    floats = [2.5, 7.0, 0.5, 1.0, 9.25, 3.0]
    assert group_medians(torch.tensor(floats), groups).tolist() == [2.5, 4.0, 2.5, 4.0, 2.5, 3.0]
    # A (group, length) key would overflow int64 here, so the two stable sorts are used.
    huge = [2**61, 5, -(2**61), 2**40, 7, 0]
    assert group_medians(torch.tensor(huge), groups).tolist() == [
        float(statistics.median([2**61, -(2**61), 7])),
        float(statistics.median([5, 2**40])),
        float(statistics.median([2**61, -(2**61), 7])),
        float(statistics.median([5, 2**40])),
        float(statistics.median([2**61, -(2**61), 7])),
        0.0,
    ]


def test_empty_batch() -> None:
    empty = torch.zeros(0, dtype=torch.long)
    assert group_medians(empty, empty).shape == (0,)
    assert length_penalty(empty, [], LengthPenaltyConfig()).shape == (0,)
    assert group_ids([]).tolist() == []


def test_group_medians_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same size"):
        group_medians(torch.tensor([1, 2]), torch.tensor([0]))


# --- groups and uids ----------------------------------------------------------------------


def test_group_ids_are_dense_in_first_appearance_order() -> None:
    assert group_ids(["x", "y", "x", 3, "y", 3]).tolist() == [0, 1, 0, 2, 1, 2]


def test_each_missing_uid_is_its_own_group() -> None:
    ids = group_ids([None, "a", None, "a"]).tolist()
    assert ids[1] == ids[3]
    assert len({ids[0], ids[1], ids[2]}) == 3


def test_group_of_one_gets_no_penalty() -> None:
    assert penalties([5, 4000, 0], ["a", "b", "c"]) == [0.0, 0.0, 0.0]


def test_missing_uid_gets_no_penalty_even_beside_a_group() -> None:
    # The two Nones must not form a group with each other (median 502 would hit both).
    assert penalties([100, 100, 100, 4, 1000], ["g", "g", "g", None, None]) == [0.0] * 5


def test_no_uids_at_all_means_no_penalty() -> None:
    assert penalties([1, 50, 4000], None) == [0.0, 0.0, 0.0]


def test_group_id_tensor_is_accepted() -> None:
    lengths = torch.tensor([100, 100, 100, 200])
    by_tensor = length_penalty(lengths, torch.tensor([4, 4, 4, 4]), LengthPenaltyConfig())
    assert by_tensor.tolist() == penalties([100, 100, 100, 200], ["u"] * 4) == [0, 0, 0, 1]


def test_uid_count_must_match() -> None:
    with pytest.raises(ValueError, match="one per sample"):
        length_penalty(torch.tensor([1, 2, 3]), ["a", "b"], LengthPenaltyConfig())


def first_appearance_ids(uids: list[Any]) -> list[int]:
    """The plain-Python grouping: a dict of first occurrences, each None alone."""
    first: dict[object, int] = {}
    ids: list[int] = []
    groups = 0
    for uid in uids:
        if uid is not None and uid in first:
            ids.append(first[uid])
            continue
        if uid is not None:
            first[uid] = groups
        ids.append(groups)
        groups += 1
    return ids


def object_array(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def equal_copy(uid: object) -> object:
    """An equal uid that is, where Python allows, another object."""
    if isinstance(uid, str):
        return "".join(list(uid))
    if isinstance(uid, int) and not isinstance(uid, bool):
        return int(str(uid))
    return uid


mixed_uids = st.one_of(
    st.none(),
    st.text(max_size=3),
    st.integers(-2, 2),
    st.integers(10**3, 10**3 + 3),  # beyond CPython's cached small ints
    st.booleans(),
    st.sampled_from([0.0, -0.0, 1.0, 2.5, math.nan]),
    st.tuples(st.integers(0, 1)),
)


@st.composite
def uid_layouts(draw: st.DrawFn) -> list[Any]:
    """Runs of repeated uid objects, as verl lays them out, and anything but that."""
    pool = draw(st.lists(mixed_uids, min_size=1, max_size=6))
    runs = st.tuples(st.integers(0, len(pool) - 1), st.integers(1, 4))
    copies = draw(st.booleans())
    uids = [
        equal_copy(pool[i]) if copies and k % 2 else pool[i]
        for i, size in draw(st.lists(runs, max_size=12))
        for k in range(size)
    ]
    if draw(st.booleans()):
        uids = draw(st.permutations(uids))
    return uids


@PROPERTY
@given(uids=uid_layouts(), form=st.sampled_from([list, tuple, object_array]))
def test_group_ids_partition_like_a_dict_of_first_occurrences(uids: list[Any], form: Any) -> None:
    assert group_ids(form(uids)).tolist() == first_appearance_ids(uids)


@PROPERTY
@given(values=st.lists(st.integers(-3, 3) | st.integers(2**62, 2**62 + 2), max_size=40))
def test_integer_group_ids_are_made_dense_in_first_appearance_order(values: list[int]) -> None:
    expected = first_appearance_ids(values)
    assert group_ids(torch.tensor(values, dtype=torch.long)).tolist() == expected
    assert group_ids(np.array(values, dtype=np.int64)).tolist() == expected


def verl_uids(prompts: int, group: int, rng: np.random.Generator) -> np.ndarray:
    """verl's uid column: one uuid4-like string per prompt, ``np.repeat``-ed ``group`` times
    (so each prompt's uid is one object, side by side)."""
    texts = [f"{rng.integers(2**63):016x}-{rng.integers(2**63):016x}" for _ in range(prompts)]
    return np.repeat(object_array(texts), group)


def assert_groups_like_a_dict(uids: Any, reference: list[Any]) -> None:
    assert group_ids(uids).tolist() == first_appearance_ids(reference)


@pytest.mark.parametrize("group", [1, 2, 8, 16])
@pytest.mark.parametrize("layout", ["side by side", "shuffled", "mostly side by side"])
def test_large_verl_uid_arrays_group_like_a_dict(group: int, layout: str) -> None:
    # Thousands of uids in the layouts verl hands over: side by side, then shuffled.
    rng = np.random.default_rng(group)
    uids = verl_uids(4096 // group, group, rng)
    if layout == "shuffled":  # as verl's balance_batch reorders the batch
        uids = uids[rng.permutation(len(uids))]
    elif layout == "mostly side by side":
        swap = rng.choice(len(uids), size=len(uids) // 10, replace=False)
        uids[swap] = uids[rng.permutation(swap)]
    assert_groups_like_a_dict(uids, uids.tolist())
    assert_groups_like_a_dict(uids.tolist(), uids.tolist())


@pytest.mark.parametrize("shuffled", [False, True])
def test_large_arrays_with_missing_uids_and_equal_copies(shuffled: bool) -> None:
    rng = np.random.default_rng(7)
    uids = verl_uids(512, 8, rng)
    uids[rng.choice(len(uids), size=300, replace=False)] = None
    # Some uids rebuilt from text (equal, other objects), some ints equal to bools/floats.
    copies = rng.choice(len(uids), size=400, replace=False)
    uids[copies] = [equal_copy(uid) for uid in uids[copies].tolist()]
    uids[:6] = [1, True, 1.0, 1000, equal_copy(1000), None]
    if shuffled:
        uids = uids[rng.permutation(len(uids))]
    assert_groups_like_a_dict(uids, uids.tolist())
    all_missing = object_array([None] * 1000)
    assert group_ids(all_missing).tolist() == list(range(1000))


def test_only_equal_copies_group_by_value() -> None:
    rng = np.random.default_rng(3)
    uids = object_array([equal_copy(uid) for uid in verl_uids(600, 4, rng).tolist()])
    assert_groups_like_a_dict(uids, uids.tolist())
    shuffled = uids[rng.permutation(len(uids))]
    assert_groups_like_a_dict(shuffled, shuffled.tolist())


def test_an_unhashable_uid_in_a_large_array_is_rejected() -> None:
    uids = verl_uids(300, 8, np.random.default_rng(1))
    uids[1234] = ["not", "hashable"]
    with pytest.raises(TypeError, match="unhashable"):
        group_ids(uids)
    with pytest.raises(TypeError, match="unhashable"):
        group_ids(uids[np.random.default_rng(2).permutation(len(uids))])
    # Distinct objects whose == gives no truth value (arrays): still the dict's TypeError.
    with pytest.raises(TypeError, match="unhashable"):
        group_ids(object_array([np.arange(2), np.arange(2), np.arange(3)]))


INT64 = np.iinfo(np.int64)


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (0, 100),  # dense ids
        (-(2**20), 2**20),
        (0, 2**40),
        (INT64.min, INT64.max),  # the whole int64 range
    ],
)
@pytest.mark.parametrize("size", [1, 2, 3000])
def test_integer_arrays_group_like_a_dict(low: int, high: int, size: int) -> None:
    rng = np.random.default_rng(size)
    pool = rng.integers(low, high, size=max(size // 5, 1), endpoint=True)
    pool[:2] = [low, high][: len(pool[:2])]
    values = rng.choice(pool, size=size)
    expected = first_appearance_ids(values.tolist())
    assert group_ids(values).tolist() == expected
    assert group_ids(torch.from_numpy(values)).tolist() == expected
    runs = np.repeat(values, 3)
    assert group_ids(runs).tolist() == first_appearance_ids(runs.tolist())


def test_other_integer_dtypes_and_bools_group_by_value() -> None:
    rng = np.random.default_rng(5)
    for dtype in (np.int8, np.uint8, np.int16, np.int32, np.uint32, np.uint64, np.bool_):
        values = rng.integers(0, 2 if dtype == np.bool_ else 100, size=2000).astype(dtype)
        assert group_ids(values).tolist() == first_appearance_ids(values.tolist()), dtype
    top = np.array([2**64 - 1, 0, 2**63, 2**64 - 1, 2**63 - 1, 0], dtype=np.uint64)
    assert group_ids(top).tolist() == [0, 1, 2, 0, 3, 1]
    assert group_ids(top[::-1]).tolist() == [0, 1, 2, 3, 0, 2]  # a view with negative strides
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.bool):
        tensor = torch.tensor([3, 1, 3, 0, 1, 1]).to(dtype)
        assert group_ids(tensor).tolist() == first_appearance_ids(tensor.tolist()), dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_group_ids_on_cuda_match_the_reference() -> None:
    values = [3, 3, 1, 1, 3, 2, 2, 7]
    ids = group_ids(torch.tensor(values, device="cuda"))
    assert ids.device.type == "cuda"
    assert ids.tolist() == first_appearance_ids(values)
    uids = ["a", "a", None, "b", None, "a"]
    moved = group_ids(uids, device="cuda")
    assert moved.device.type == "cuda"
    assert moved.tolist() == first_appearance_ids(uids)


def test_group_ids_of_verl_uids_an_object_array_of_repeated_uuid_strings() -> None:
    prompts = [f"{i:08x}-uuid" for i in range(5)]
    uids = np.repeat(object_array(prompts), 4)
    ids = group_ids(uids, device="cpu")
    assert ids.dtype == torch.long
    assert ids.tolist() == [i // 4 for i in range(20)]
    rebuilt = [equal_copy(uid) for uid in uids.tolist()]
    assert group_ids(rebuilt).tolist() == ids.tolist()
    assert group_ids(rebuilt[::-1]).tolist() == [i // 4 for i in range(20)]


def test_fixed_width_string_and_float_arrays_group_by_value() -> None:
    assert group_ids(np.array(["b", "a", "b", "b"])).tolist() == [0, 1, 0, 0]
    # NaN equals nothing, not even itself, so each NaN sample is a group of its own.
    assert group_ids(np.array([1.0, math.nan, math.nan, 1.0])).tolist() == [0, 1, 2, 0]


def test_group_ids_rejects_unhashable_uids_and_bad_arrays() -> None:
    with pytest.raises(TypeError, match="unhashable"):
        group_ids([["a"], ["a"]])
    with pytest.raises(TypeError, match="unhashable"):
        group_ids(["a", {"a"}])
    with pytest.raises(TypeError, match="unhashable"):  # alone, a dict still hashes it
        group_ids([None, ["a"], None])
    with pytest.raises(TypeError, match="integer"):
        group_ids(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        group_ids(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D"):
        group_ids(torch.zeros((2, 2), dtype=torch.long))


# --- zero lengths -------------------------------------------------------------------------


def test_zero_median_means_no_penalty() -> None:
    # M = 0: the penalty applies only where M > 0, so even L = 500 is left alone.
    assert penalties([0, 0, 500], ["g", "g", "g"]) == [0.0, 0.0, 0.0]
    assert penalties([0, 0], ["g", "g"]) == [0.0, 0.0]


def test_zero_length_in_a_positive_median_group_gets_max_penalty() -> None:
    assert penalties([0, 100, 100], ["g"] * 3, max_penalty=0.7) == pytest.approx([0.7, 0, 0])


# --- band edges ---------------------------------------------------------------------------

# Ratios that are exact binary fractions put the edges exactly on integers: with M = 100,
# M(1-o)=50, M(1-p)=75, M(1+p)=125, M(1+o)=150.
EXACT: dict[str, Any] = {"peak_ratio": 0.25, "outer_ratio": 0.5}


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (49, 1.0),  # beyond the outer band
        (50, 1.0),  # L = M(1-o): the ramp reaches max_penalty
        (51, 0.96),  # just inside the lower ramp
        (74, 0.04),  # just outside the zero band
        (75, 0.0),  # L = M(1-p): inclusive
        (76, 0.0),
        (100, 0.0),
        (124, 0.0),
        (125, 0.0),  # L = M(1+p): inclusive
        (126, 0.04),  # just outside the zero band
        (149, 0.96),
        (150, 1.0),  # L = M(1+o)
        (151, 1.0),  # beyond the outer band
    ],
)
def test_band_edges(length: int, expected: float) -> None:
    # Three 100s make the group median exactly 100 whatever the fourth length is.
    lengths = [100, 100, 100, length]
    actual = penalties(lengths, ["g"] * 4, **EXACT)
    assert actual[3] == pytest.approx(expected, abs=1e-6)
    assert actual[3] == pytest.approx(
        ref.trapezoid(length, 100.0, max_penalty=1.0, **EXACT), abs=1e-6
    )


@pytest.mark.parametrize(
    ("length", "expected"),
    [(49, 1.0), (50, 1.0), (69, 0.05), (70, 0.0), (130, 0.0), (131, 0.05), (150, 1.0)],
)
def test_default_ratio_edges(length: int, expected: float) -> None:
    # 0.3 is not a binary fraction; M(1-p) and M(1+p) must still land on 70 and 130.
    assert penalties([100, 100, 100, length], ["g"] * 4)[3] == pytest.approx(expected, abs=1e-6)


def test_edges_with_an_even_group_median() -> None:
    # [80, 120]: M = 100 puts both inside [75, 125]; torch's M = 80 would put 120 at M(1+o).
    assert penalties([80, 120], ["g", "g"], **EXACT) == [0.0, 0.0]
    lower = group_median_penalty(
        torch.tensor([120]), torch.tensor([80.0]), LengthPenaltyConfig(**EXACT)
    )
    assert lower.tolist() == [1.0]


# --- scaling, enable, sign ----------------------------------------------------------------


def test_max_penalty_scales_the_whole_trapezoid() -> None:
    lengths = [100, 100, 100, 10, 60, 74, 90, 130, 140, 500]
    uids: list[object | None] = ["g"] * len(lengths)
    unit = penalties(lengths, uids, **EXACT)
    scaled = penalties(lengths, uids, max_penalty=2.5, **EXACT)
    assert scaled == pytest.approx([2.5 * x for x in unit])
    assert max(scaled) == pytest.approx(2.5)
    assert penalties(lengths, uids, max_penalty=0.0, **EXACT) == [0.0] * len(lengths)


def test_penalty_scale_is_left_to_the_caller() -> None:
    # reward = rule + coef * judge - penalty_scale * penalty: scaling here too would apply
    # penalty_scale twice.
    lengths = [100, 100, 100, 10, 60, 140]
    uids: list[object | None] = ["g"] * len(lengths)
    assert penalties(lengths, uids, penalty_scale=3.0) == penalties(lengths, uids)
    assert penalties(lengths, uids)[3] == 1.0


def test_disabled_gives_float32_zeros() -> None:
    out = length_penalty(torch.tensor([100, 100, 1]), ["g"] * 3, LengthPenaltyConfig(enable=False))
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, 0.0, 0.0]


def test_trapezoid_ignores_enable_and_takes_medians_directly() -> None:
    cfg = LengthPenaltyConfig(enable=False, **EXACT)
    out = group_median_penalty(torch.tensor([60, 100]), torch.tensor([100.0, 100.0]), cfg)
    assert out.tolist() == pytest.approx([0.6, 0.0])


def test_int32_lengths_are_accepted() -> None:
    lengths = torch.tensor([100, 100, 100, 60], dtype=torch.int32)
    assert length_penalty(lengths, ["g"] * 4, LengthPenaltyConfig(**EXACT))[3].item() == (
        pytest.approx(0.6)
    )


# --- overlong shape -----------------------------------------------------------------------


def overlong_cfg(**overrides: Any) -> LengthPenaltyConfig:
    fields: dict[str, Any] = {
        "penalty_shape": "overlong",
        "max_resp_len": 100,
        "overlong_buffer_len": 20,
    }
    return LengthPenaltyConfig(**(fields | overrides))


def test_overlong_term_is_non_positive_and_linear_in_the_buffer() -> None:
    lengths = torch.tensor([0, 50, 80, 81, 90, 100, 110])
    term = overlong_penalty(lengths, max_resp_len=100, buffer_len=20, penalty_factor=1.0)
    assert term.dtype == torch.float32
    assert term.tolist() == pytest.approx([0, 0, 0, -0.05, -0.5, -1.0, -1.5])


def test_overlong_length_penalty_is_the_negated_term() -> None:
    lengths = torch.tensor([0, 80, 90, 100])
    penalty = length_penalty(lengths, None, overlong_cfg(overlong_penalty_factor=2.0))
    assert penalty.tolist() == pytest.approx([0.0, 0.0, 1.0, 2.0])
    assert not bool(torch.signbit(penalty).any()), "no -0.0 penalties"


def test_overlong_ignores_groups() -> None:
    lengths = torch.tensor([10, 95, 100])
    grouped = length_penalty(lengths, ["g", "g", "g"], overlong_cfg())
    assert grouped.tolist() == length_penalty(lengths, None, overlong_cfg()).tolist()
    assert grouped.tolist() == pytest.approx([0.0, 0.75, 1.0])


def test_overlong_rejects_a_zero_buffer() -> None:
    with pytest.raises(ValueError, match="buffer_len must be > 0"):
        overlong_penalty(torch.tensor([1]), 100, 0, 1.0)


# --- response lengths and placement -------------------------------------------------------


def test_response_lengths_from_a_padded_mask() -> None:
    # prompt_len 3 (left-padded prompts), response_len 4 (right-padded responses).
    mask = torch.tensor(
        [
            [0, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 0, 0, 0, 0],
        ]
    )
    assert response_lengths(mask, 3).tolist() == [3, 4, 0]
    assert response_lengths(mask.bool(), 3).tolist() == [3, 4, 0]


def test_response_lengths_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="2-D"):
        response_lengths(torch.ones(5), 1)
    with pytest.raises(ValueError, match="prompt_len 8 outside"):
        response_lengths(torch.ones(2, 7), 8)


def test_place_at_last_token() -> None:
    out = place_at_last_token(
        torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([3, 4, 0]), (3, 4)
    )
    assert out.dtype == torch.float32
    assert out.tolist() == [
        [0.0, 0.0, 0.5, 0.0],
        [0.0, 0.0, 0.0, -1.0],
        [2.0, 0.0, 0.0, 0.0],  # zero-length response: index 0
    ]


def test_place_at_last_token_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        place_at_last_token(torch.ones(2), torch.tensor([1, 5]), (2, 4))
    with pytest.raises(ValueError, match="must both be"):
        place_at_last_token(torch.ones(2), torch.tensor([1, 2]), (3, 4))
    with pytest.raises(ValueError, match="response_len is 0"):
        place_at_last_token(torch.ones(1), torch.tensor([0]), (1, 0))


def test_end_to_end_from_mask_to_token_rewards() -> None:
    prompt_len, width = 2, 8
    lengths_wanted = [4, 4, 4, 8, 1]
    mask = torch.zeros(5, prompt_len + width, dtype=torch.long)
    mask[:, :prompt_len] = 1
    for row, n in enumerate(lengths_wanted):
        mask[row, prompt_len : prompt_len + n] = 1
    lengths = response_lengths(mask, prompt_len)
    cfg = LengthPenaltyConfig()
    penalty = length_penalty(lengths, ["a", "a", "a", "a", None], cfg)
    rewards = place_at_last_token(1.0 - cfg.penalty_scale * penalty, lengths, (5, width))
    assert rewards.sum(-1).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0, 1.0])
    assert rewards[3, 7].item() == 0.0 and rewards[0, 3].item() == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4096, (4096,), generator=gen)
    groups = torch.arange(4096) // 8
    cfg = LengthPenaltyConfig()
    cpu = length_penalty(lengths, groups, cfg)
    cuda = length_penalty(lengths.cuda(), groups.cuda(), cfg)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=TOL, atol=TOL)


# --- config -------------------------------------------------------------------------------


def test_config_defaults() -> None:
    cfg = LengthPenaltyConfig()
    assert cfg.model_dump() == {
        "enable": True,
        "penalty_scale": 1.0,
        "max_penalty": 1.0,
        "peak_ratio": 0.3,
        "outer_ratio": 0.5,
        "enable_openai_reward": True,
        "api_key": None,
        "model_name": None,
        "reward_coefficient": 1.0,
        "use_async_io": False,
        "max_concurrent_requests": 10,
        "judge_when": "correct_only",
        "on_judge_failure": "rule_only",
        "penalty_shape": "group_median",
        "overlong_buffer_len": None,
        "overlong_penalty_factor": 1.0,
        "max_resp_len": None,
        "judge_base_url": None,
        "judge_timeout_s": 60.0,
        "score_timeout_s": 600.0,
    }
    assert all(f.description for f in LengthPenaltyConfig.model_fields.values())


@pytest.mark.parametrize(("peak", "outer"), [(0.5, 0.3), (0.4, 0.4), (0.0, 0.0)])
def test_outer_ratio_must_exceed_peak_ratio_and_the_error_names_both(
    peak: float, outer: float
) -> None:
    with pytest.raises(ValidationError) as info:
        LengthPenaltyConfig(peak_ratio=peak, outer_ratio=outer)
    message = str(info.value)
    assert f"outer_ratio ({outer})" in message
    assert f"peak_ratio ({peak})" in message


@pytest.mark.parametrize(
    "bad",
    [
        {"peak_ratio": -0.1},
        {"peak_ratio": 1.0, "outer_ratio": 0.9},
        {"outer_ratio": 1.0},
        {"penalty_scale": -1.0},
        {"max_penalty": -0.5},
        {"max_concurrent_requests": 0},
        {"judge_when": "sometimes"},
        {"on_judge_failure": "retry"},
        {"penalty_shape": "linear"},
        {"judge_timeout_s": 0},
        {"score_timeout_s": -1},
        {"overlong_buffer_len": 0},
        {"peek_ratio": 0.2},  # a typo must not be ignored
    ],
)
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LengthPenaltyConfig(**bad)


def test_overlong_shape_needs_both_lengths() -> None:
    with pytest.raises(ValidationError, match="needs both max_resp_len and overlong_buffer_len"):
        LengthPenaltyConfig(penalty_shape="overlong", max_resp_len=100)
    with pytest.raises(ValidationError, match="needs both"):
        LengthPenaltyConfig(penalty_shape="overlong", overlong_buffer_len=10)


def test_overlong_buffer_must_fit_in_the_response() -> None:
    with pytest.raises(ValidationError, match=r"overlong_buffer_len \(101\) must be <= max_resp"):
        overlong_cfg(overlong_buffer_len=101)
    assert overlong_cfg(overlong_buffer_len=100).overlong_buffer_len == 100


def test_config_is_frozen() -> None:
    cfg = LengthPenaltyConfig()
    with pytest.raises(ValidationError):
        cfg.peak_ratio = 0.1


def test_api_key_is_secret() -> None:
    cfg = LengthPenaltyConfig(api_key="sk-do-not-print")  # type: ignore[arg-type]
    assert isinstance(cfg.api_key, SecretStr)
    assert "sk-do-not-print" not in repr(cfg)
    assert cfg.api_key.get_secret_value() == "sk-do-not-print"


class DictConfigLike(Mapping[str, Any]):
    """A read-only mapping that is not a dict, as OmegaConf's DictConfig is."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_from_mapping() -> None:
    data = {"peak_ratio": 0.2, "outer_ratio": 0.6, "use_async_io": True, "api_key": "sk-x"}
    for mapping in (data, DictConfigLike(data)):
        cfg = LengthPenaltyConfig.from_mapping(mapping)
        assert (cfg.peak_ratio, cfg.outer_ratio, cfg.use_async_io) == (0.2, 0.6, True)
        assert cfg.api_key is not None and cfg.api_key.get_secret_value() == "sk-x"
    assert LengthPenaltyConfig.from_mapping(None) == LengthPenaltyConfig()
    assert LengthPenaltyConfig.from_mapping({}) == LengthPenaltyConfig()
    with pytest.raises(ValidationError, match=r"outer_ratio \(0.2\)"):
        LengthPenaltyConfig.from_mapping(DictConfigLike({"peak_ratio": 0.3, "outer_ratio": 0.2}))
