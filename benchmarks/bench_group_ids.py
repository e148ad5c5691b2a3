"""Time ``group_ids`` (uid -> dense group id) before and after it stopped looping in Python.

The batch is a GRPO step's uids: ``--batch`` samples, one uuid4 string per prompt, each
repeated ``--group`` times side by side. It is timed in the forms a caller may hold:

- ``object array``: verl's ``non_tensor_batch["uid"]``, a numpy object array built by
  ``np.repeat`` (so each prompt's uid is one object, repeated);
- ``list``: the same uids as a Python list (what the reward manager passes today);
- ``list, equal copies``: every uid an equal but distinct ``str`` (uids rebuilt from
  text), which takes the slower exact path;
- ``int64 tensor``: group ids already hashed by the caller (the documented fast path);
  its "before" is the old loop over the same ids as a list of ints, since the old
  function did not accept a tensor (it hashed each element tensor by identity).

"before" is the per-sample dict loop that ``group_ids`` used to be (kept below as the
baseline); "after" is :func:`producer.penalties.group_ids`. Both are called alternately,
``--repeats`` times each after a warm-up, and the medians are reported with their ratio.
Both are checked to give the same ids before timing.

Usage::

    .venv/bin/python benchmarks/bench_group_ids.py [--batch 131072] [--group 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer.penalties import group_ids  # noqa: E402


def group_ids_before(
    uids: Sequence[object | None], device: torch.device | str | None = None
) -> torch.Tensor:
    """``group_ids`` as it was: one dict lookup per sample, in Python."""
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


def make_inputs(batch: int, group: int, seed: int) -> dict[str, tuple[Any, Any]]:
    """The uids of one step in each form that is timed: (input before, input after)."""
    rng = np.random.default_rng(seed)
    prompts = np.array(
        [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(-(-batch // group))],
        dtype=object,
    )
    verl = np.repeat(prompts, group)[:batch]
    as_list = verl.tolist()
    copies = ["".join(list(uid)) for uid in as_list]
    ints = torch.arange(batch) // group
    return {
        "object array": (verl, verl),
        "list": (as_list, as_list),
        "list, equal copies": (copies, copies),
        "int64 tensor": (ints.tolist(), ints),
    }


def paired_medians(
    before: Callable[[], object],
    after: Callable[[], object],
    repeats: int,
    sync: Callable[[], None],
) -> tuple[float, float]:
    """Median wall times in ms of ``before`` and ``after``, called alternately."""
    times: dict[str, list[float]] = {"before": [], "after": []}
    before()
    after()
    sync()
    for _ in range(repeats):
        for name, fn in (("before", before), ("after", after)):
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1000)
    return statistics.median(times["before"]), statistics.median(times["after"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=131072)
    parser.add_argument("--group", type=int, default=8, help="samples per uid")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="where the ids go, e.g. cuda (default: cpu)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    inputs = make_inputs(args.batch, args.group, args.seed)
    print(
        f"batch={args.batch} group={args.group} device={device} repeats={args.repeats} "
        f"torch threads={torch.get_num_threads()}"
    )
    print(f"{'uids':<22}{'before ms':>12}{'after ms':>12}{'before/after':>15}")
    results: dict[str, dict[str, float]] = {}
    for form, (old_uids, uids) in inputs.items():
        expected = group_ids_before(old_uids, device=device)
        if not torch.equal(group_ids(uids, device=device), expected):
            print(f"{form}: group_ids disagrees with the baseline", file=sys.stderr)
            return 1
        before, after = paired_medians(
            lambda old_uids=old_uids: group_ids_before(old_uids, device=device),
            lambda uids=uids: group_ids(uids, device=device),
            args.repeats,
            sync,
        )
        results[form] = {"before_ms": before, "after_ms": after, "ratio": before / after}
        print(f"{form:<22}{before:>12.2f}{after:>12.2f}{before / after:>14.1f}x")

    if args.json is not None:
        payload = {
            "batch": args.batch,
            "group": args.group,
            "device": str(device),
            "repeats": args.repeats,
            "median_ms": results,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
