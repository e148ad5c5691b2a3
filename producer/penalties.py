"""Length penalties in torch, computed on the trainer's device while the judge works.

Two shapes (formulas in DESIGN.md):

- ``"group_median"``, the group-median trapezoid: no penalty within ``peak_ratio`` of the
  median length of the sample's GRPO group (``uid``), a linear ramp up to ``max_penalty``
  at ``outer_ratio``, ``max_penalty`` beyond.
- ``"overlong"``, DAPO's soft overlong buffer: a linear penalty over the last
  ``buffer_len`` tokens before ``max_resp_len``.

Sign convention. :func:`group_median_penalty` and :func:`length_penalty` return a
*penalty*: non-negative, to be subtracted,
``reward = rule + reward_coefficient * judge - penalty_scale * penalty``.
:func:`overlong_penalty` keeps DAPO's published convention and returns a *reward term*:
non-positive, to be added. :func:`length_penalty` negates it, so callers only ever see
the first convention.

Everything is vectorized over the batch and runs on the device of its inputs. The
arithmetic is done in float64 (float32 on devices without float64, such as MPS) so that
band edges such as ``L == M * (1 - p)`` classify the same way as in a plain-Python
reference; results are returned as float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from rewardq.producer.config import LengthPenaltyConfig

__all__ = [
    "group_ids",
    "group_median_penalty",
    "group_medians",
    "length_penalty",
    "overlong_penalty",
    "place_at_last_token",
    "response_lengths",
]


def _compute_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else the extra precision is free at these sizes.
    return torch.float32 if device.type == "mps" else torch.float64


def response_lengths(attention_mask: Tensor, prompt_len: int) -> Tensor:
    """Valid response length of each sample, in tokens.

    Args:
        attention_mask: ``(batch, prompt_len + response_len)`` mask, 1 (or True) on real
            tokens, as in verl's ``DataProto.batch["attention_mask"]``.
        prompt_len: number of prompt columns (verl left-pads prompts to this width).

    Returns:
        ``(batch,)`` int64 tensor, ``attention_mask[:, prompt_len:].sum(-1)``.

    Raises:
        ValueError: if the mask is not 2-D or ``prompt_len`` is outside ``[0, width]``.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D, got shape {tuple(attention_mask.shape)}")
    if not 0 <= prompt_len <= attention_mask.shape[1]:
        raise ValueError(
            f"prompt_len {prompt_len} outside [0, {attention_mask.shape[1]}] (the mask's width)"
        )
    return attention_mask[:, prompt_len:].sum(-1).to(torch.long)


def group_ids(
    uids: Sequence[object | None] | npt.NDArray[Any] | Tensor,
    device: torch.device | str | None = None,
) -> Tensor:
    """Map GRPO uids to dense group ids, in order of first appearance.

    A sample without a uid (``None``) forms a group of its own, so it is its own median
    and gets no group-median penalty. Uids are grouped as a ``dict`` groups its keys
    (equal hashables share a group), without a Python-level step per sample:

    - a 1-D numpy object array (verl's ``non_tensor_batch["uid"]``; pass it as it is)
      or a sequence (copied into one first, about 1 ms per 131,072 uids): samples are
      grouped by object identity, in bulk on the objects' addresses (verl repeats each
      prompt's uid object ``n`` times, and keeps those objects through ``balance_batch``'s
      reordering and Ray's pickling), then the distinct objects are checked by value
      with one ``set``. Equal uids that are distinct objects (rebuilt from text) are
      merged by a ``dict`` over the distinct objects only. 131,072 verl uids in groups of
      8 take 0.9-1.0 ms side by side, 1.8-1.9 ms shuffled, and 6.5-7 ms rebuilt from
      text, on one core of a loaded 2-core host (``benchmarks/bench_group_ids.py``, each
      call following other work, as in a trainer step; shuffled, 1.5 ms back to back);
    - a 1-D integer (or bool) tensor or numpy array holds group ids already, the fast
      path for callers that hash uids themselves (any integers: they are made dense;
      0.4-0.6 ms side by side, 0.9-1.0 ms shuffled, for 131,072 on the host). On an
      accelerator the ids are made dense there, without a copy to the host;
    - any other 1-D numpy array (fixed-width strings, floats) is compared by value.

    Args:
        uids: one hashable uid, or ``None``, per sample; or an array of group ids.
        device: where to put the result (default: the device of a tensor ``uids``, else
            the CPU).

    Returns:
        ``(batch,)`` int64 tensor of ids in ``[0, number_of_groups)``.

    Raises:
        TypeError: if a uid is not hashable, or a tensor of group ids is not integer.
        ValueError: if an array or tensor of uids is not 1-D.
    """
    if isinstance(uids, Tensor):
        if uids.dim() != 1:
            raise ValueError(f"uids must be 1-D, got shape {tuple(uids.shape)}")
        if uids.is_floating_point() or uids.is_complex():
            raise TypeError(f"a tensor of group ids must be integer, got {uids.dtype}")
        if uids.device.type != "cpu":
            return _dense_integer_ids(uids).to(uids.device if device is None else device)
        uids = uids.numpy()
    if isinstance(uids, np.ndarray):
        if uids.ndim != 1:
            raise ValueError(f"uids must be 1-D, got shape {uids.shape}")
        values = np.ascontiguousarray(uids)
    else:
        values = np.fromiter(uids, dtype=object, count=len(uids))
    return _host_group_ids(values).to(device)


def _dense_integer_ids(groups: Tensor) -> Tensor:
    """``group_ids`` of a 1-D integer tensor, computed on its device."""
    groups = groups.to(torch.long)
    starts = torch.ones(groups.shape, dtype=torch.bool, device=groups.device)
    starts[1:] = groups[1:] != groups[:-1]
    runs = torch.cumsum(starts, 0) - 1
    heads = groups[starts]
    # Rank the distinct heads by their first run, so that ids follow first appearance
    # even when a group comes back after others.
    unique, inverse = torch.unique(heads, return_inverse=True)
    positions = torch.arange(heads.numel(), device=groups.device)
    first = torch.full_like(unique, heads.numel()).scatter_reduce_(0, inverse, positions, "amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(unique.numel(), device=groups.device)
    return rank[inverse][runs]


_NONE_ADDRESS = id(None)


def _host_group_ids(values: npt.NDArray[Any]) -> Tensor:
    """``group_ids`` of a 1-D numpy array, on the host, in three vectorized stages.

    1. Runs: a sample whose uid is the one before it (the same object, for an object
       array; the same value otherwise) joins its run, so that verl's ``np.repeat`` layout
       leaves one head per prompt. Every ``None`` heads a run of its own. Skipped where
       most runs would be of one sample.
    2. Identity (object arrays) or value (integer arrays): heads with equal addresses (or
       integers) are grouped by :func:`_factorize_integers`, so that a layout shuffled
       after the repeat (verl's ``balance_batch``) costs no Python step per sample either.
    3. Value (object arrays): the distinct objects left, one per group so far, go through
       one ``set``, in address order; only if two of them are equal (uids rebuilt from
       text) are they merged by a ``dict`` in Python (:func:`_equal_objects`). This keeps
       ``dict`` semantics exact, and raises ``TypeError`` for an unhashable uid, as a dict
       would.
    """
    # The ids go straight into torch's memory: a fresh 1 MB numpy result per call was
    # measured to cost more than the grouping itself where glibc trims the heap after it.
    ids = torch.empty(values.shape, dtype=torch.long)
    size = len(values)
    if size == 0:
        return ids
    if values.dtype.kind not in "Obiu":
        return _host_group_ids_by_value(values, ids)
    by_identity = values.dtype == object
    keys = np.frombuffer(values, dtype=np.intp) if by_identity else _as_int64(values)
    starts = _run_starts(values)
    heads: npt.NDArray[np.intp] | None = None  # the samples that head runs; None: all
    if 2 * int(np.count_nonzero(starts)) <= size:
        heads = np.flatnonzero(starts)
        keys = keys[heads]
    named: npt.NDArray[np.intp] | None = None  # the heads that are not None; None: all
    if by_identity:
        is_named = keys != _NONE_ADDRESS
        if not is_named.all():
            named = np.flatnonzero(is_named)
            keys = keys[named]
    if (by_identity and heads is not None
            and _all_distinct(values[heads if named is None else heads[named]].tolist())):
        # verl's layout: one object per prompt, side by side; all differ, by value too.
        _run_ids(starts, ids)
        return ids
    out = ids.numpy()
    codes, leaders = _factorize_integers(
        keys, shift=_ADDRESS_SHIFT if by_identity else 0,
        out=out if heads is None and named is None else None)
    if by_identity:
        at = leaders if named is None else named[leaders]
        # Most samples distinct objects: uids rebuilt from text, likely side by side still.
        equal = _equal_objects(values, at if heads is None else heads[at],
                               neighbours_first=2 * len(leaders) > size,
                               addresses=keys[leaders])
        if equal is not None:
            codes = equal[0][codes]
            leaders = leaders[equal[1]]
    merged = len(leaders) < len(keys)  # else every head is a group of its own
    if merged and named is not None:
        codes = _with_singletons(codes, named[leaders], named,
                                 size if heads is None else len(heads))
    if heads is None:
        if not merged:
            out[:] = np.arange(size)
        elif codes is not out:
            np.copyto(out, codes)
        return ids
    _run_ids(starts, ids)
    if merged:
        np.take(codes, out, out=out)
    return ids


def _run_ids(starts: npt.NDArray[np.bool_], ids: Tensor) -> None:
    """``ids[i]`` = the run sample ``i`` is in, counting from 0, given where runs start."""
    torch.cumsum(torch.from_numpy(starts.astype(np.int64)), 0, out=ids)
    ids.numpy()[:] -= 1  # numpy's: torch may hand 128k elements to its thread pool


def _with_singletons(
    codes: npt.NDArray[np.int64],
    leaders: npt.NDArray[np.intp],
    named: npt.NDArray[np.intp],
    size: int,
) -> npt.NDArray[np.int64]:
    """Ids of ``size`` heads: those at ``named`` grouped by ``codes`` (whose groups start
    at ``leaders``), every other head a group of its own; dense, in order of first
    appearance."""
    is_first = np.ones(size, dtype=bool)
    is_first[named] = False
    is_first[leaders] = True
    rank = _cumsum(is_first)
    rank -= 1
    rank[named] = rank[leaders][codes]
    return rank


def _host_group_ids_by_value(values: npt.NDArray[Any], ids: Tensor) -> Tensor:
    """Fixed-width strings, floats and the like: runs by value, then a ``dict`` (so a NaN
    is a group of its own, and ``-0.0`` joins ``0.0``)."""
    starts = _run_starts(values)
    _run_ids(starts, ids)
    heads = values[starts].tolist()
    if not _all_distinct(heads):
        codes, _ = _first_appearance_codes(heads)
        out = ids.numpy()
        np.take(codes, out, out=out)
    return ids


def _as_int64(values: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Integer or bool values as int64 keys, one to one (a uint64 above 2**63 wraps round,
    which keeps them distinct: only equality matters)."""
    if values.dtype == np.uint64:
        return values.view(np.int64)
    return values.astype(np.int64, copy=False)


def _factorize_integers(
    keys: npt.NDArray[np.int64], *, shift: int = 0, out: npt.NDArray[np.int64] | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Group equal integers: ``(codes, leaders)``.

    ``codes[i]`` is the group of ``keys[i]``, numbered in order of first appearance;
    ``leaders[c]`` is the position where group ``c`` first appears (so ``leaders``
    ascends). All distinct keys give ``codes == leaders == arange`` (and leave ``out``
    alone); otherwise the codes are written to ``out`` where one is given. Keys equal after
    ``>> shift`` (of their distance to the smallest) are taken to be equal: for object
    addresses, ``shift`` is log2 of the smallest object's size.

    Keys that span less than ``_TABLE_SPAN`` times their number (object addresses of uids
    made together, dense group ids) are looked up in a table indexed by key, O(n)
    (:func:`_factorize_by_table`); others are sorted once, key and position packed into
    one int64 where they fit.
    """
    size = len(keys)
    if size <= 1:
        positions = np.arange(size)
        return positions, positions
    low = int(keys.min())
    distance = int(keys.max()) - low
    span = distance >> shift
    if span < _TABLE_SPAN * size:
        return _factorize_by_table(keys, low, shift, span, out)
    key = keys - low  # wraps round past 2**63, which the unsigned view undoes
    if distance >= 2**63:
        key = key.view(np.uint64)
        key >>= shift
        if span < 2**63:
            key = key.view(np.int64)
    else:
        key >>= shift
    order, sorted_keys = _argsort(key, span)
    new = np.empty(size, dtype=bool)
    new[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    group_starts = np.flatnonzero(new)
    if len(group_starts) == size:
        positions = np.arange(size)
        return positions, positions
    # Equal keys sort by position, so a group's first element in ``order`` leads it.
    by_key = order[group_starts]
    is_leader = np.zeros(size, dtype=bool)
    is_leader[by_key] = True
    rank = _cumsum(is_leader)
    rank -= 1
    codes = np.empty(size, dtype=np.int64) if out is None else out
    codes[order] = np.repeat(rank[by_key], np.diff(group_starts, append=size))
    return codes, np.flatnonzero(is_leader)


def _factorize_by_table(
    keys: npt.NDArray[np.int64], low: int, shift: int, span: int,
    out: npt.NDArray[np.int64] | None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """:func:`_factorize_integers` of keys whose ``(key - low) >> shift`` lie in
    ``[0, span]``, through a table of ``span + 1`` positions: one scatter, two gathers.

    The keys are laid out back to front once, so that the scatter that fills the table
    leaves each key's first position where numpy writes in order, and every pass reads
    and writes contiguous memory (a scatter through a reversed view was measured at
    twice the time). Table and positions are int32 where the batch allows: half the
    memory to miss in the cache.
    """
    size = len(keys)
    dtype: type[np.signedinteger[Any]] = (
        np.int32 if size <= np.iinfo(np.int32).max else np.int64)
    backwards = np.subtract(keys[::-1], low)
    backwards >>= shift
    positions = np.arange(size - 1, -1, -1, dtype=dtype)  # of ``backwards``' elements
    table: npt.NDArray[np.signedinteger[Any]] = np.empty(span + 1, dtype=dtype)
    table[backwards] = positions
    is_first = _first_positions(table, backwards, positions) == positions
    leaders = np.subtract(size - 1, np.flatnonzero(is_first)[::-1])
    if len(leaders) == size:
        return leaders, leaders
    key = backwards[::-1]
    table[key[leaders]] = np.arange(len(leaders), dtype=dtype)  # now each key's group
    codes = np.empty(size, dtype=np.int64) if out is None else out
    codes[:] = table[key]
    return codes, leaders


def _first_positions(
    table: npt.NDArray[np.signedinteger[Any]],
    key: npt.NDArray[Any],
    positions: npt.NDArray[np.signedinteger[Any]],
) -> npt.NDArray[np.signedinteger[Any]]:
    """Each key's first position, given a ``table`` that holds *a* position of each key.

    numpy does not promise in which order a fancy assignment writes repeated indices; where
    some key's entry is not its first position, the first positions of the keys that show
    it (one of them is that key's first) are folded in with ``np.minimum.at``.
    """
    first: npt.NDArray[np.signedinteger[Any]] = np.take(table, key)
    late = first > positions
    if late.any():
        np.minimum.at(table, key[late], positions[late])
        first = np.take(table, key)
    return first


# Keys spanning up to this many times their number go through a table (int32 entries, so
# at most 64 bytes a key), a scatter and two gathers; wider ones are sorted. For 131,072
# keys the table took 0.6-0.8 ms up to 16 times, 0.9-1.1 ms at 32 times, 5 ms at 64 times
# (a fresh 32 MiB of memory each call), the sort 5.5-6.8 ms (this host, back to back).
_TABLE_SPAN = 16


def _argsort(key: npt.NDArray[np.int64], span: int
             ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(order, key[order])`` of non-negative keys up to ``span``, ties in order of
    position: packed with the position into one int64 and sorted as plain integers
    (several times faster than numpy's ``argsort``) where they fit."""
    size = len(key)
    bits = (size - 1).bit_length()
    if span.bit_length() + bits > 63:
        order = np.argsort(key, kind="stable")
        return order, key[order]
    packed = key << bits
    packed |= np.arange(size)
    packed.sort()
    order = packed & ((1 << bits) - 1)
    packed >>= bits
    return order, packed


def _cumsum(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Running count of a boolean mask (torch's int64 cumsum is 3-4x numpy's)."""
    counts = torch.cumsum(torch.from_numpy(mask.astype(np.int64)), 0)
    return counts.numpy()


# Distinct live objects lie at least this many bytes apart (``>>`` for the addresses).
_ADDRESS_SHIFT = object.__basicsize__.bit_length() - 1


def _run_starts(values: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """True where a sample's uid is not the one before it; every ``None`` is True.

    Object arrays are compared by identity, other arrays by value.
    """
    starts = np.ones(values.shape, dtype=bool)
    if values.dtype != object:
        np.not_equal(values[1:], values[:-1], out=starts[1:])
        return starts
    # The objects' addresses, compared in bulk: a repeated uid object costs no Python
    # call. They are never dereferenced, and ``values`` keeps the objects alive.
    address = np.frombuffer(values, dtype=np.intp)
    np.not_equal(address[1:], address[:-1], out=starts[1:])
    starts |= address == _NONE_ADDRESS
    return starts


def _equal_objects(
    values: npt.NDArray[Any],
    at: npt.NDArray[np.intp],
    *,
    neighbours_first: bool,
    addresses: npt.NDArray[np.intp],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None:
    """Groups of equal objects among the distinct ones ``values[at]`` (whose
    ``addresses`` are given), by ``dict`` equality: ``(codes, leaders)`` as
    :func:`_factorize_integers` gives them, or ``None`` where all differ.

    One ``set`` of them says whether any are equal; only then does a ``dict`` number them,
    in Python. The set takes them in (nearly) address order (:func:`_address_order`): for
    16,384 uuid strings shuffled by verl's ``balance_batch`` and no longer in the cache,
    0.9 ms against 1.2 ms in the order they came (same run, this host). With
    ``neighbours_first``, equal neighbours are merged first by one bulk ``==`` (in C), so
    that uids rebuilt from text in verl's layout, one object per sample, reach the set
    and the dict once per run rather than once per sample.
    """
    if not neighbours_first or len(at) <= 1:
        in_address_order = at[_address_order(addresses)] if len(at) > 1 else at
        if _all_distinct(values[in_address_order].tolist()):
            return None
        return _first_appearance_codes(values[at].tolist())
    objects = values[at]
    try:
        same = np.equal(objects[1:], objects[:-1], dtype=bool)
    except Exception:  # an ``==`` that gives no truth value: the dict will decide
        same = None
    if same is None or not same.any():
        listed = objects.tolist()
        return None if _all_distinct(listed) else _first_appearance_codes(listed)
    starts = np.ones(len(objects), dtype=bool)
    np.logical_not(same, out=starts[1:])
    run_heads = np.flatnonzero(starts)
    runs = _cumsum(starts)
    runs -= 1
    listed = objects[run_heads].tolist()
    if _all_distinct(listed):
        return runs, run_heads
    codes, leaders = _first_appearance_codes(listed)
    return codes[runs], run_heads[leaders]


def _address_order(addresses: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """An order of ``addresses`` that ascends bucket by bucket, the buckets the least
    power of two that cuts their span into at most 65,536: a stable radix sort of uint16,
    O(n), so that objects are read nearly in sequence, which the CPU's prefetcher
    follows, rather than at random."""
    low = int(addresses.min())
    shift = max((int(addresses.max()) - low).bit_length() - 16, 0)
    buckets = np.subtract(addresses, low)
    buckets >>= shift
    return np.argsort(buckets.astype(np.uint16), kind="stable")


def _all_distinct(values: list[Any]) -> bool:
    # Raises TypeError for an unhashable uid, as a dict would.
    distinct: set[object] = set(values)
    return len(distinct) == len(values)


def _first_appearance_codes(
    uids: list[Any],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(codes, leaders)`` as :func:`_factorize_integers` gives them, by ``dict``
    equality (no ``None`` among ``uids``)."""
    dense: dict[object, int] = {}
    codes: list[int] = []
    leaders: list[int] = []
    for position, uid in enumerate(uids):
        code = dense.get(uid)
        if code is None:
            code = dense[uid] = len(leaders)
            leaders.append(position)
        codes.append(code)
    return np.array(codes, dtype=np.int64), np.array(leaders, dtype=np.int64)


def group_medians(lengths: Tensor, groups: Tensor) -> Tensor:
    """Median length of each sample's group, numpy-style.

    An even-sized group gets the mean of its two middle values (numpy's median), not the
    lower one that ``torch.median`` returns. Samples are sorted by (group, length), then
    each group's two middle elements are gathered at offsets given by its ``bincount``
    size. It waits for the device, as ``torch.unique`` does: output sizes depend on data.

    Args:
        lengths: ``(batch,)`` lengths (integer or float).
        groups: ``(batch,)`` integer group ids; need not be dense.

    Returns:
        ``(batch,)`` float64 tensor (float32 on devices without float64) on the device of
        ``lengths``. Exact for integer lengths: the two middle values are added as
        integers before the halving.

    Raises:
        ValueError: if the shapes differ or are not 1-D.
    """
    if lengths.dim() != 1 or lengths.shape != groups.shape:
        raise ValueError(
            f"lengths and groups must be 1-D of the same size, got {tuple(lengths.shape)} "
            f"and {tuple(groups.shape)}"
        )
    dtype = _compute_dtype(lengths.device)
    if lengths.numel() == 0:
        return torch.empty(0, dtype=dtype, device=lengths.device)
    unique, dense = torch.unique(groups.to(lengths.device), return_inverse=True)
    sorted_lengths = lengths[_order_by_group_then_length(lengths, dense, unique.numel())]
    sizes = torch.bincount(dense, minlength=unique.numel())
    starts = torch.cumsum(sizes, 0) - sizes
    lower = sorted_lengths[starts + (sizes - 1) // 2]
    upper = sorted_lengths[starts + sizes // 2]
    return ((lower + upper).to(dtype) / 2)[dense]


def _order_by_group_then_length(lengths: Tensor, dense: Tensor, num_groups: int) -> Tensor:
    if not lengths.is_floating_point():
        low, high = (int(v) for v in torch.stack(torch.aminmax(lengths)).tolist())
        span = high - low + 1
        # One sort of a combined key is 2-4x faster than two stable sorts on CPU, but only
        # when the key cannot overflow int64; token counts always qualify.
        if num_groups * span < 2**62:
            return torch.sort(dense * span + (lengths.to(torch.long) - low)).indices
    by_length = torch.sort(lengths, stable=True).indices
    return by_length[torch.sort(dense[by_length], stable=True).indices]


def group_median_penalty(lengths: Tensor, medians: Tensor, cfg: LengthPenaltyConfig) -> Tensor:
    """The group-median trapezoid (DESIGN.md), a non-negative penalty.

    With ``L`` the length, ``M`` its group median, ``p = cfg.peak_ratio`` and
    ``o = cfg.outer_ratio``: 0 for ``M(1-p) <= L <= M(1+p)``; a linear ramp to
    ``cfg.max_penalty`` at ``M(1-o)`` and at ``M(1+o)``; ``cfg.max_penalty`` beyond. Where
    ``M <= 0`` the penalty is 0. ``cfg.enable`` and ``cfg.penalty_scale`` are not applied
    here (see :func:`length_penalty`).

    Args:
        lengths: ``(batch,)`` response lengths.
        medians: ``(batch,)`` group medians, e.g. from :func:`group_medians`.
        cfg: supplies ``peak_ratio``, ``outer_ratio`` and ``max_penalty``.

    Returns:
        ``(batch,)`` float32 tensor in ``[0, max_penalty]`` on the device of ``lengths``.

    Raises:
        ValueError: if the shapes differ.
    """
    if lengths.shape != medians.shape:
        raise ValueError(
            f"lengths and medians must have the same shape, got {tuple(lengths.shape)} "
            f"and {tuple(medians.shape)}"
        )
    dtype = _compute_dtype(lengths.device)
    length = lengths.to(dtype)
    median = medians.to(device=lengths.device, dtype=dtype)
    p, o, top = cfg.peak_ratio, cfg.outer_ratio, cfg.max_penalty
    inner_low, inner_high = median * (1 - p), median * (1 + p)
    outer_low, outer_high = median * (1 - o), median * (1 + o)
    # torch.where evaluates both ramps everywhere; a ramp whose band is empty after
    # rounding divides by zero, but its value is never selected.
    below = top * (inner_low - length) / (inner_low - outer_low)
    above = top * (length - inner_high) / (outer_high - inner_high)
    penalty = torch.full_like(length, top)
    penalty = torch.where((length >= outer_low) & (length < inner_low), below, penalty)
    penalty = torch.where((length > inner_high) & (length <= outer_high), above, penalty)
    in_band = (length >= inner_low) & (length <= inner_high)
    penalty = torch.where(in_band | (median <= 0), torch.zeros_like(length), penalty)
    return penalty.to(torch.float32)


def overlong_penalty(
    lengths: Tensor, max_resp_len: int, buffer_len: int, penalty_factor: float
) -> Tensor:
    """DAPO's soft overlong penalty, as a non-positive *reward term* (to be added).

    ``expected = max_resp_len - buffer_len``;
    ``term = min(-(L - expected) / buffer_len * penalty_factor, 0)``: 0 up to
    ``expected``, ``-penalty_factor`` at ``max_resp_len``, linear in between (and beyond).

    Args:
        lengths: ``(batch,)`` response lengths.
        max_resp_len: maximum response length in tokens.
        buffer_len: tokens before ``max_resp_len`` over which the penalty grows.
        penalty_factor: magnitude of the term at ``L == max_resp_len``.

    Returns:
        ``(batch,)`` float32 tensor, ``<= 0``, on the device of ``lengths``.

    Raises:
        ValueError: if ``buffer_len <= 0``.
    """
    if buffer_len <= 0:
        raise ValueError(f"buffer_len must be > 0, got {buffer_len}")
    length = lengths.to(_compute_dtype(lengths.device))
    expected = max_resp_len - buffer_len
    term = -(length - expected) / buffer_len * penalty_factor
    return term.clamp(max=0.0).to(torch.float32)


def length_penalty(
    lengths: Tensor,
    uids_or_groups: Sequence[object | None] | Tensor | None,
    cfg: LengthPenaltyConfig,
) -> Tensor:
    """The configured length penalty, always non-negative (to be subtracted).

    The caller computes ``reward = rule + reward_coefficient * judge - penalty_scale *
    penalty``; ``penalty_scale`` is deliberately not applied here, so it is applied once.

    Args:
        lengths: ``(batch,)`` response lengths, e.g. from :func:`response_lengths`.
        uids_or_groups: per-sample uids (``None`` entries are singleton groups), a
            ``(batch,)`` tensor of integer group ids, or ``None`` (no groups: every sample
            alone, hence no group-median penalty). Ignored by the ``"overlong"`` shape.
        cfg: the length-penalty config.

    Returns:
        ``(batch,)`` float32 tensor, ``>= 0``, on the device of ``lengths``; all zeros when
        ``cfg.enable`` is false.

    Raises:
        ValueError: if ``lengths`` is not 1-D, the groups have another size, or an
            ``"overlong"`` config lacks ``max_resp_len``/``overlong_buffer_len``.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if not cfg.enable:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    if cfg.penalty_shape == "overlong":
        if cfg.max_resp_len is None or cfg.overlong_buffer_len is None:
            raise ValueError('penalty_shape="overlong" needs max_resp_len and overlong_buffer_len')
        term = overlong_penalty(
            lengths, cfg.max_resp_len, cfg.overlong_buffer_len, cfg.overlong_penalty_factor
        )
        # 0.0 - x rather than -x: a clamped 0.0 stays +0.0 instead of becoming -0.0.
        return 0.0 - term
    if uids_or_groups is None:
        groups = torch.arange(lengths.numel(), device=lengths.device)
    elif isinstance(uids_or_groups, Tensor):
        groups = uids_or_groups.to(lengths.device)
    else:
        groups = group_ids(uids_or_groups, device=lengths.device)
    if groups.shape != lengths.shape:
        raise ValueError(
            f"{groups.numel()} uids/groups for {lengths.numel()} lengths: need one per sample"
        )
    return group_median_penalty(lengths, group_medians(lengths, groups), cfg)


def place_at_last_token(scores: Tensor, lengths: Tensor, shape: Sequence[int]) -> Tensor:
    """Scatter one score per sample onto its last valid response token (verl's convention).

    A zero-length response has no last token; its score goes to index 0, so it still
    reaches the trainer. (Index ``-1``, what ``lengths - 1`` would give, is the last
    padding column, which the trainer masks out.)

    Args:
        scores: ``(batch,)`` scores.
        lengths: ``(batch,)`` valid response lengths, each in ``[0, response_len]``.
        shape: ``(batch, response_len)``, the shape of verl's ``responses``.

    Returns:
        float32 tensor of ``shape`` on the device of ``scores``, zero except
        ``out[i, max(lengths[i] - 1, 0)] = scores[i]``.

    Raises:
        ValueError: if ``shape`` is not ``(batch, response_len)`` with ``response_len >= 1``
            for a non-empty batch, or a length is outside ``[0, response_len]``.
    """
    if len(shape) != 2:
        raise ValueError(f"shape must be (batch, response_len), got {tuple(shape)}")
    batch, width = int(shape[0]), int(shape[1])
    if scores.shape != (batch,) or lengths.shape != (batch,):
        raise ValueError(
            f"scores {tuple(scores.shape)} and lengths {tuple(lengths.shape)} must both be "
            f"({batch},) for shape {(batch, width)}"
        )
    out = torch.zeros((batch, width), dtype=torch.float32, device=scores.device)
    if batch == 0:
        return out
    if width == 0:
        raise ValueError("response_len is 0: there is no token to put the score on")
    index = lengths.to(device=scores.device, dtype=torch.long)
    if bool(((index < 0) | (index > width)).any()):
        raise ValueError(f"lengths must lie in [0, {width}]")
    index = (index - 1).clamp(min=0)
    out.scatter_(1, index.unsqueeze(1), scores.to(torch.float32).unsqueeze(1))
    return out
