"""Time ``group_ids`` (uid -> dense group id) alone and inside a whole step's penalty path.

The batch is a GRPO step's uids: ``--batch`` samples, one uuid4 string per prompt, each
repeated ``--group`` times. ``group_ids`` is timed in the forms a caller may hold:

- ``object array``: verl's ``non_tensor_batch["uid"]``, a numpy object array built by
  ``np.repeat`` (each prompt's uid one object, repeated side by side), which the reward
  manager passes as it is;
- ``object array, shuffled``: the same after verl's ``balance_batch`` reorders the batch
  (on by default, and done before the reward is computed);
- ``list``: the same uids as a Python list;
- ``list, equal copies``: every uid an equal but distinct ``str`` (uids rebuilt from text);
- ``int64 tensor`` and ``int64 tensor, shuffled``: group ids already hashed by the caller.

``step`` times what the reward manager does for the penalty of one step, on the shuffled
object array: response lengths from a verl-like int64 attention mask of shape
``(batch, --prompt-len + --max-resp)``, group ids, group medians, the group-median
penalty, and the reward placed on each sample's last token (a ``(batch, --max-resp)``
tensor), the trainer's other work left out.

Implementations, called in turn (each round in another of their orders, so that none
finds its data left warm in the caches by itself), ``--repeats`` times each after a
warm-up, in the same run (medians, with the ratio to ``now``):

- ``base`` (with ``--baseline REV``): ``group_ids`` as ``producer/penalties.py`` is at git
  revision ``REV``;
- ``now``: :func:`rewardq.producer.penalties.group_ids`.

Both are checked to give the same ids before timing.

Usage::

    .venv/bin/python benchmarks/bench_group_ids.py [--batch 131072] [--group 8] \\
        [--repeats 24] [--device cpu|cuda] [--baseline REV] [--forms FORM ...] \\
        [--step-repeats 8] [--prompt-len 512] [--max-resp 1024] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
import statistics
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewardq.producer.config import LengthPenaltyConfig  # noqa: E402
from rewardq.producer.penalties import (  # noqa: E402
    group_ids,
    group_medians,
    length_penalty,
    place_at_last_token,
    response_lengths,
)

GroupIds = Callable[..., torch.Tensor]


def load_group_ids(rev: str) -> GroupIds:
    """``group_ids`` as ``producer/penalties.py`` is at git revision ``rev``."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:producer/penalties.py"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    module = types.ModuleType(f"penalties_at_{rev}")
    exec(compile(source, f"producer/penalties.py@{rev}", "exec"), module.__dict__)
    function: GroupIds = module.group_ids
    return function


def make_inputs(batch: int, group: int, seed: int) -> dict[str, Any]:
    """The uids of one step in each form that is timed."""
    rng = np.random.default_rng(seed)
    prompts = np.array(
        [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(-(-batch // group))],
        dtype=object,
    )
    verl = np.repeat(prompts, group)[:batch]
    order = rng.permutation(batch)
    ints = torch.arange(batch) // group
    return {
        "object array": verl,
        "object array, shuffled": verl[order],
        "list": verl.tolist(),
        "list, equal copies": ["".join(list(uid)) for uid in verl.tolist()],
        "int64 tensor": ints,
        "int64 tensor, shuffled": ints[order],
    }


def make_mask(batch: int, prompt_len: int, max_resp: int, seed: int) -> torch.Tensor:
    """A verl-like int64 attention mask: left-padded prompts, right-padded responses."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros((batch, prompt_len + max_resp), dtype=torch.long)
    prompt_lens = torch.randint(1, prompt_len + 1, (batch,), generator=gen)
    resp_lens = torch.randint(0, max_resp + 1, (batch,), generator=gen)
    cols = torch.arange(prompt_len + max_resp)
    for start in range(0, batch, 8192):  # in slices: no full-size boolean temporaries
        rows = slice(start, start + 8192)
        prompt_part = cols >= (prompt_len - prompt_lens[rows]).unsqueeze(1)
        resp_part = (cols >= prompt_len) & (cols < (prompt_len + resp_lens[rows]).unsqueeze(1))
        mask[rows] = torch.where(cols < prompt_len, prompt_part, resp_part)
    return mask


def penalty_step(
    find_groups: GroupIds, mask: torch.Tensor, uids: Any, prompt_len: int,
    cfg: LengthPenaltyConfig,
) -> torch.Tensor:
    """The reward manager's penalty path for one step, as ``producer/reward_manager.py``
    runs it: lengths, group ids, medians, penalty, the reward on the last token."""
    lengths = response_lengths(mask, prompt_len)
    groups = find_groups(uids, device=lengths.device)
    group_medians(lengths, groups)  # the reward manager reports them beside the rewards
    penalty = length_penalty(lengths, groups, cfg)
    reward = -cfg.penalty_scale * penalty  # the judge's score left out
    return place_at_last_token(reward, lengths, (mask.shape[0], mask.shape[1] - prompt_len))


def timed_medians(
    functions: Mapping[str, Callable[[], object]], repeats: int, sync: Callable[[], None]
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) time in ms of each function, called in turn ``repeats``
    times, each round in another of their orders (a seeded random sequence of all of
    them), so that each follows each of the others as often. The CPU time is the steadier
    figure on a shared, loaded host."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in functions}
    for fn in functions.values():
        fn()
    sync()
    orders = list(itertools.permutations(functions.items()))
    random.Random(0).shuffle(orders)
    for round_ in range(repeats):
        for name, fn in orders[round_ % len(orders)]:
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name].append(
                ((time.perf_counter() - start) * 1000, (time.process_time() - cpu) * 1000)
            )
    return {
        name: (statistics.median(t[0] for t in values), statistics.median(t[1] for t in values))
        for name, values in times.items()
    }


def print_row(label: str, medians: dict[str, tuple[float, float]], names: list[str]) -> None:
    now = medians["now"][0]
    print(f"{label:<25}" + "".join(f"{medians[n][0]:>10.2f}" for n in names)
          + "".join(f"{medians[n][0] / now:>9.2f}x" for n in names if n != "now")
          + "".join(f"{medians[n][1]:>10.2f}" for n in names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=131072)
    parser.add_argument("--group", type=int, default=8, help="samples per uid")
    parser.add_argument("--repeats", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="where the ids and the mask go, e.g. cuda (default: cpu)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--baseline", metavar="REV",
        help="also time group_ids as it is at this git revision (column 'base')",
    )
    parser.add_argument(
        "--forms", nargs="*", metavar="FORM", help="time only these forms of the uids"
    )
    parser.add_argument("--step-repeats", type=int, default=8,
                        help="rounds of the whole-step penalty path (0: skip it)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-resp", type=int, default=1024)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    implementations: dict[str, GroupIds] = {}
    if args.baseline is not None:
        implementations["base"] = load_group_ids(args.baseline)
    implementations["now"] = group_ids
    names = list(implementations)
    inputs = make_inputs(args.batch, args.group, args.seed)
    if args.forms is not None:
        inputs = {form: inputs[form] for form in args.forms}
    print(
        f"batch={args.batch} group={args.group} device={device} repeats={args.repeats} "
        f"torch threads={torch.get_num_threads()}"
        + (f" base={args.baseline}" if args.baseline else "")
        + "; medians in ms, same run"
    )
    print(f"{'':<25}" + "".join(f"{n:>10}" for n in names)
          + "".join(f"{n + '/now':>10}" for n in names if n != "now")
          + "".join(f"{n + ' cpu':>10}" for n in names))
    results: dict[str, dict[str, float]] = {}

    def record(label: str, medians: dict[str, tuple[float, float]]) -> None:
        results[label] = {
            **{f"{n}_ms": medians[n][0] for n in names},
            **{f"{n}_cpu_ms": medians[n][1] for n in names},
        }
        print_row(label, medians, names)

    for form, uids in inputs.items():
        expected = group_ids(uids, device=device)
        for name, fn in implementations.items():
            if not torch.equal(fn(uids, device=device), expected):
                print(f"{form}: {name} disagrees with now", file=sys.stderr)
                return 1
        calls: dict[str, Callable[[], object]] = {
            name: functools.partial(fn, uids, device=device)
            for name, fn in implementations.items()}
        record(form, timed_medians(calls, args.repeats, sync))

    if args.step_repeats > 0:
        cfg = LengthPenaltyConfig()
        mask = make_mask(args.batch, args.prompt_len, args.max_resp, args.seed).to(device)
        uids = make_inputs(args.batch, args.group, args.seed)["object array, shuffled"]
        steps: dict[str, Callable[[], torch.Tensor]] = {
            name: functools.partial(penalty_step, fn, mask, uids, args.prompt_len, cfg)
            for name, fn in implementations.items()}
        reference = steps["now"]()
        for name, step in steps.items():
            if not torch.equal(step(), reference):
                print(f"step: {name} disagrees with now", file=sys.stderr)
                return 1
        print(f"whole step's penalty path: mask {tuple(mask.shape)} int64 on {device}, "
              f"shuffled object array, {args.step_repeats} rounds")
        record("step", timed_medians(steps, args.step_repeats, sync))
        del mask

    if args.json is not None:
        payload = {
            "batch": args.batch,
            "group": args.group,
            "device": str(device),
            "repeats": args.repeats,
            "step_repeats": args.step_repeats,
            "mask_shape": [args.batch, args.prompt_len + args.max_resp],
            "baseline": args.baseline,
            "median_ms": results,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
