"""Length penalties in torch, computed on the trainer's device while the judge works.

Two shapes (formulas in :func:`group_median_penalty` and :func:`overlong_penalty`):

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

    Uids are grouped as a ``dict`` groups its keys: equal hashables share a group (``1``,
    ``1.0`` and ``True`` too), and a sample without a uid (``None``) forms a group of its
    own, so it is its own median and gets no group-median penalty.

    - A sequence or a 1-D numpy array of objects (verl's ``non_tensor_batch["uid"]``), of
      strings or of floats: one ``dict`` lookup per sample. A float NaN equals no other
      NaN, so each NaN sample of a float array is a group of its own.
    - A 1-D integer (or bool) tensor or numpy array holds group ids already (any
      integers: they are made dense). A tensor's ids are made dense on its device,
      without a copy to the host.

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
        return _dense_integer_ids(uids).to(uids.device if device is None else device)
    if isinstance(uids, np.ndarray):
        if uids.ndim != 1:
            raise ValueError(f"uids must be 1-D, got shape {uids.shape}")
        if uids.dtype.kind in "biu":
            # uint64 viewed as int64 keeps distinct values distinct: only equality matters.
            as_int64 = (np.ascontiguousarray(uids).view(np.int64) if uids.dtype == np.uint64
                        else uids.astype(np.int64))
            return _dense_integer_ids(torch.from_numpy(as_int64)).to(device)
        return torch.from_numpy(_first_appearance_ids(uids.tolist())).to(device)
    return torch.from_numpy(_first_appearance_ids(uids)).to(device)


def _first_appearance_ids(uids: Sequence[object | None]) -> npt.NDArray[np.int64]:
    """Group ids by ``dict`` equality; raises ``TypeError`` for an unhashable uid."""
    dense: dict[object, int] = {}
    # Each missing uid becomes a fresh object(), a key equal to no other: a group of its own.
    ids = (dense.setdefault(object() if uid is None else uid, len(dense)) for uid in uids)
    return np.fromiter(ids, dtype=np.int64, count=len(uids))


def _dense_integer_ids(groups: Tensor) -> Tensor:
    """Integer group ids made dense in order of first appearance, on their device."""
    groups = groups.to(torch.long)
    unique, inverse = torch.unique(groups, return_inverse=True)
    positions = torch.arange(groups.numel(), device=groups.device)
    first = torch.full_like(unique, groups.numel()).scatter_reduce_(0, inverse, positions, "amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(unique.numel(), device=groups.device)
    return rank[inverse]


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
        # One sort of a combined key (group, length) rather than two stable sorts, where
        # the key cannot overflow int64; token counts always fit.
        if num_groups * span < 2**62:
            return torch.sort(dense * span + (lengths.to(torch.long) - low)).indices
    by_length = torch.sort(lengths, stable=True).indices
    return by_length[torch.sort(dense[by_length], stable=True).indices]


def group_median_penalty(lengths: Tensor, medians: Tensor, cfg: LengthPenaltyConfig) -> Tensor:
    """The group-median trapezoid, a non-negative penalty.

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
