"""Time ``group_ids`` (uid -> dense group id) now against the versions before it.

The batch is a GRPO step's uids: ``--batch`` samples, one uuid4 string per prompt, each
repeated ``--group`` times. It is timed in the forms a caller may hold:

- ``object array``: verl's ``non_tensor_batch["uid"]``, a numpy object array built by
  ``np.repeat`` (so each prompt's uid is one object, repeated side by side); what the
  reward manager now passes as it is;
- ``object array, shuffled``: the same after verl's ``balance_batch`` reorders the batch
  (on by default, and done before the reward is computed), so a group's samples are
  scattered; the objects are still shared;
- ``list``: the same uids as a Python list (what the reward manager passed before);
- ``list, equal copies``: every uid an equal but distinct ``str`` (uids rebuilt from
  text), which takes the slower exact path (a dict over the distinct objects);
- ``int64 tensor`` and ``int64 tensor, shuffled``: group ids already hashed by the caller.

The implementations, called in turn (each round in another of their orders),
``--repeats`` times each after a warm-up, in the same run (medians, with ratios to
``now``):

- ``loop``: the per-sample dict loop that ``group_ids`` first was (for a tensor, the
  loop over the same ids as a list of ints: that version hashed each element tensor by
  identity);
- ``runs``: the version that found runs of one repeated object by their addresses and
  fell back to the loop for any other layout (kept below, verbatim in behaviour);
- ``base`` (with ``--baseline REV``): ``group_ids`` as ``producer/penalties.py`` is at
  git revision ``REV``, for a before -> after in one run;
- ``now``: :func:`rewardq.producer.penalties.group_ids`.

All are checked to give the same ids before timing. Each call follows calls of the
others, so it does not find its data left warm in the caches by itself, as in a trainer
step; called back to back, ``now`` on the shuffled array measured 1.5 ms where this
benchmark gave 1.8-1.9 ms.

Usage::

    .venv/bin/python benchmarks/bench_group_ids.py [--batch 131072] [--group 8] \\
        [--repeats 24] [--device cpu|cuda] [--baseline REV] [--forms FORM ...] \\
        [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewardq.producer.penalties import group_ids  # noqa: E402

TARGET_MS = 2.0  # issue 14: 131,072 uids -> group ids


# --- "loop": the first version --------------------------------------------------------------


def group_ids_loop(
    uids: Sequence[object | None], device: torch.device | str | None = None
) -> torch.Tensor:
    """``group_ids`` as it first was: one dict lookup per sample, in Python."""
    dense: dict[object, int] = {}
    ids: list[int] = []
    next_id = 0
    for uid in uids:
        if uid is None:
            ids.append(next_id)
            next_id += 1
            continue
        gid = dense.get(uid)
        if gid is None:
            gid = dense[uid] = next_id
            next_id += 1
        ids.append(gid)
    return torch.tensor(ids, dtype=torch.long, device=device)


# --- "runs": the second version (commit e5d0050) ------------------------------------------


def group_ids_runs(uids: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """``group_ids`` as it was before the address table: runs of one repeated object,
    then a ``set`` of the heads, else the per-head dict loop."""
    if isinstance(uids, torch.Tensor):
        uids = uids.numpy()
    if isinstance(uids, np.ndarray):
        values = np.ascontiguousarray(uids)
    else:
        values = np.fromiter(uids, dtype=object, count=len(uids))
    ids = torch.empty(values.shape, dtype=torch.long)
    by_identity = values.dtype == object
    starts = _runs_run_starts(values, by_identity=by_identity)
    runs = np.cumsum(starts, dtype=np.int64, out=ids.numpy())
    runs -= 1
    heads = values[starts]
    if by_identity:
        if 2 * len(heads) <= len(values) and _runs_all_distinct(heads):
            return ids.to(device)
        value_starts = _runs_run_starts(heads, by_identity=False)
        heads = heads[value_starts]
        np.take(np.cumsum(value_starts, dtype=np.int64) - 1, runs, out=runs)
    if not _runs_all_distinct(heads):
        np.take(group_ids_loop(heads.tolist()).numpy(), runs, out=runs)
    return ids.to(device)


def _runs_run_starts(values: npt.NDArray[Any], *, by_identity: bool) -> npt.NDArray[np.bool_]:
    starts = np.ones(values.shape, dtype=bool)
    if values.dtype != object:
        np.not_equal(values[1:], values[:-1], out=starts[1:])
        return starts
    address = np.frombuffer(values, dtype=np.intp)
    if by_identity:
        np.not_equal(address[1:], address[:-1], out=starts[1:])
    else:
        np.logical_not(np.equal(values[1:], values[:-1], dtype=bool), out=starts[1:])
    starts |= address == id(None)
    return starts


def _runs_all_distinct(values: npt.NDArray[Any]) -> bool:
    return len(set(values.tolist())) == len(values)


def load_group_ids(rev: str) -> Callable[..., torch.Tensor]:
    """``group_ids`` as ``producer/penalties.py`` is at git revision ``rev``."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:producer/penalties.py"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    module = types.ModuleType(f"penalties_at_{rev}")
    exec(compile(source, f"producer/penalties.py@{rev}", "exec"), module.__dict__)
    function: Callable[..., torch.Tensor] = module.group_ids
    return function


# --- the benchmark --------------------------------------------------------------------------


def make_inputs(batch: int, group: int, seed: int) -> dict[str, tuple[Any, Any]]:
    """The uids of one step in each form that is timed: (input of "loop", input of the
    others)."""
    rng = np.random.default_rng(seed)
    prompts = np.array(
        [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(-(-batch // group))],
        dtype=object,
    )
    verl = np.repeat(prompts, group)[:batch]
    order = rng.permutation(batch)
    shuffled = verl[order]
    as_list = verl.tolist()
    copies = ["".join(list(uid)) for uid in as_list]
    ints = torch.arange(batch) // group
    return {
        "object array": (as_list, verl),
        "object array, shuffled": (shuffled.tolist(), shuffled),
        "list": (as_list, as_list),
        "list, equal copies": (copies, copies),
        "int64 tensor": (ints.tolist(), ints),
        "int64 tensor, shuffled": (ints[order].tolist(), ints[order]),
    }


def timed_medians(
    functions: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) time in ms of each function, called in turn ``repeats``
    times. The CPU time is the steadier figure on a shared, loaded host.

    Each round calls them in another of their orders (all of them, in a seeded random
    sequence), so that each follows each of the others as often (exactly, when
    ``repeats`` is a multiple of the number of orders: 24 for four): a call that follows
    one doing the same work finds it warm (the same data in the caches, the same blocks
    of memory free). In a fixed order ``now`` after ``base`` measured a third faster than
    ``base`` with identical code; in random orders, 10-15% either way.
    """
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=131072)
    parser.add_argument("--group", type=int, default=8, help="samples per uid")
    parser.add_argument("--repeats", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="where the ids go, e.g. cuda (default: cpu)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--baseline", metavar="REV",
        help="also time group_ids as it is at this git revision (column 'base')",
    )
    parser.add_argument(
        "--forms", nargs="+", metavar="FORM", help="time only these forms of the uids"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    implementations: dict[str, Callable[..., torch.Tensor]] = {
        "loop": group_ids_loop, "runs": group_ids_runs}
    if args.baseline is not None:
        implementations["base"] = load_group_ids(args.baseline)
    implementations["now"] = group_ids
    others = [name for name in implementations if name != "now"]
    inputs = make_inputs(args.batch, args.group, args.seed)
    if args.forms:
        inputs = {form: inputs[form] for form in args.forms}
    print(
        f"batch={args.batch} group={args.group} device={device} repeats={args.repeats} "
        f"torch threads={torch.get_num_threads()}"
        + (f" base={args.baseline}" if args.baseline else "")
        + "; medians in ms, same run"
    )
    print(f"{'uids':<25}" + "".join(f"{name:>9}" for name in implementations)
          + "".join(f"{name + '/now':>10}" for name in others) + f"{'now cpu':>9}")
    results: dict[str, dict[str, float]] = {}
    for form, (loop_uids, uids) in inputs.items():
        expected = group_ids_loop(loop_uids, device=device)
        for name in others[1:] + ["now"]:
            if not torch.equal(implementations[name](uids, device=device), expected):
                print(f"{form}: {name} disagrees with the loop", file=sys.stderr)
                return 1
        medians = timed_medians(
            {
                name: (lambda fn=fn, arg=loop_uids if name == "loop" else uids:
                       fn(arg, device=device))
                for name, fn in implementations.items()
            },
            args.repeats,
            sync,
        )
        now = medians["now"][0]
        results[form] = {
            **{f"{name}_ms": medians[name][0] for name in implementations},
            **{f"{name}_over_now": medians[name][0] / now for name in others},
            **{f"{name}_cpu_ms": medians[name][1] for name in implementations},
        }
        print(f"{form:<25}" + "".join(f"{medians[name][0]:>9.2f}" for name in implementations)
              + "".join(f"{medians[name][0] / now:>9.2f}x" for name in others)
              + f"{medians['now'][1]:>9.2f}")
    if args.json is not None:
        payload = {
            "batch": args.batch,
            "group": args.group,
            "device": str(device),
            "repeats": args.repeats,
            "baseline": args.baseline,
            "median_ms": results,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if "object array" in results and "object array, shuffled" in results:
        verl = [results[form] for form in ("object array", "object array, shuffled")]
        print(f"verl's uid column, side by side / shuffled: {verl[0]['now_ms']:.2f} / "
              f"{verl[1]['now_ms']:.2f} ms wall, {verl[0]['now_cpu_ms']:.2f} / "
              f"{verl[1]['now_cpu_ms']:.2f} ms CPU (target <= {TARGET_MS} ms for 131,072)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
