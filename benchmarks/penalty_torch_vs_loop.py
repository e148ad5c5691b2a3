"""Time the vectorized torch length penalty against a per-sample Python loop.

The batch is what a GRPO step hands the reward manager: an attention mask of shape
``(batch, prompt_len + max_resp)`` with left-padded prompts and right-padded responses of
random length, and uuid-string uids shared by groups of ``--group`` samples.

Both paths compute lengths, group medians and the group-median trapezoid penalty:

- torch: :func:`rewardq.producer.penalties.response_lengths`, :func:`group_ids` and
  :func:`length_penalty` (CPU, and CUDA when available with the mask already there);
- loop: the per-row ``mask[i, prompt_len:].sum()`` that verl's reward managers do, then the
  plain-Python reference of ``tests/penalty_reference.py``.

Each stage is timed ``--repeats`` times (``--loop-repeats`` for the slow loop) and the
median is reported. The two paths' penalties are checked to agree before timing.

Usage::

    .venv/bin/python benchmarks/penalty_torch_vs_loop.py [--batch 16384] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# tests/ by its own path: verl installs a top-level ``tests`` package that would win.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import penalty_reference as ref  # noqa: E402

from rewardq.producer.config import LengthPenaltyConfig  # noqa: E402
from rewardq.producer.penalties import group_ids, length_penalty, response_lengths  # noqa: E402


def make_batch(
    batch: int, group: int, prompt_len: int, max_resp: int, seed: int
) -> tuple[torch.Tensor, list[object | None]]:
    """A verl-like attention mask and per-group uuid uids."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, prompt_len + 1, (batch,), generator=gen)
    resp_lens = torch.randint(0, max_resp + 1, (batch,), generator=gen)
    cols = torch.arange(prompt_len + max_resp)
    prompt_part = cols >= (prompt_len - prompt_lens).unsqueeze(1)
    resp_part = (cols >= prompt_len) & (cols < (prompt_len + resp_lens).unsqueeze(1))
    mask = torch.where(cols < prompt_len, prompt_part, resp_part).to(torch.long)
    group_uids = [str(uuid.UUID(int=int(i) + 1)) for i in range(-(-batch // group))]
    uids: list[object | None] = [group_uids[i // group] for i in range(batch)]
    return mask, uids


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def torch_stages(
    mask: torch.Tensor, uids: list[object | None], prompt_len: int, cfg: LengthPenaltyConfig
) -> dict[str, Callable[[], object]]:
    lengths = response_lengths(mask, prompt_len)

    def penalty() -> object:
        return length_penalty(lengths, uids, cfg)

    def total() -> object:
        return length_penalty(response_lengths(mask, prompt_len), uids, cfg)

    return {
        "lengths": lambda: response_lengths(mask, prompt_len),
        "penalty from uids": penalty,
        "  of which uids": lambda: group_ids(uids, device=mask.device),
        "total": total,
    }


def loop_stages(
    mask: torch.Tensor, uids: list[object | None], prompt_len: int, cfg: LengthPenaltyConfig
) -> dict[str, Callable[[], object]]:
    def lengths() -> list[int]:
        return [int(mask[i, prompt_len:].sum()) for i in range(mask.shape[0])]

    cached = lengths()

    def penalty() -> object:
        return ref.length_penalties(cached, uids, cfg)

    def total() -> object:
        return ref.length_penalties(lengths(), uids, cfg)

    # The reference groups uids inside its median step, so it has no separate stage.
    return {"lengths": lengths, "penalty from uids": penalty, "total": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--group", type=int, default=8, help="samples per uid")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-resp", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--loop-repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = LengthPenaltyConfig()
    mask, uids = make_batch(args.batch, args.group, args.prompt_len, args.max_resp, args.seed)

    expected = ref.length_penalties(
        [int(n) for n in response_lengths(mask, args.prompt_len).tolist()], uids, cfg
    )
    actual = length_penalty(response_lengths(mask, args.prompt_len), uids, cfg).tolist()
    worst = max(abs(a - e) for a, e in zip(actual, expected, strict=True))
    if worst > 1e-5:
        print(f"torch and loop disagree by {worst}", file=sys.stderr)
        return 1

    def no_sync() -> None:
        return None

    results: dict[str, dict[str, float]] = {}
    columns = ["torch cpu"]
    for stage, fn in torch_stages(mask, uids, args.prompt_len, cfg).items():
        results.setdefault(stage, {})["torch cpu"] = median_ms(fn, args.repeats, no_sync)
    if torch.cuda.is_available():
        columns.append("torch cuda")
        cuda_mask = mask.cuda()
        for stage, fn in torch_stages(cuda_mask, uids, args.prompt_len, cfg).items():
            results[stage]["torch cuda"] = median_ms(fn, args.repeats, torch.cuda.synchronize)
    columns.append("loop")
    for stage, fn in loop_stages(mask, uids, args.prompt_len, cfg).items():
        results[stage]["loop"] = median_ms(fn, args.loop_repeats, no_sync)

    header = f"{'stage':<20}" + "".join(f"{c + ' ms':>15}" for c in columns)
    header += "".join(f"{'loop/' + c:>17}" for c in columns[:-1])
    print(
        f"batch={args.batch} group={args.group} mask={tuple(mask.shape)} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}/{args.loop_repeats} "
        f"max|torch-loop|={worst:.1e}"
    )
    print(header)
    for stage, row in results.items():
        line = f"{stage:<20}" + "".join(
            f"{row[c]:>15.2f}" if c in row else f"{'-':>15}" for c in columns
        )
        for c in columns[:-1]:
            line += f"{row['loop'] / row[c]:>16.1f}x" if "loop" in row else f"{'-':>17}"
        print(line)

    if args.json is not None:
        payload: dict[str, Any] = {
            "batch": args.batch,
            "group": args.group,
            "mask_shape": list(mask.shape),
            "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "loop_repeats": args.loop_repeats,
            "max_abs_diff": worst,
            "median_ms": {stage.strip(): row for stage, row in results.items()},
            "speedup_total": {
                c: results["total"]["loop"] / results["total"][c] for c in columns[:-1]
            },
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
