"""``rewardq bench`` end to end on a tiny step: untimed, it checks the report's shape.

Every number a timing produces is only checked to be there and positive; how fast
anything is belongs to the benchmark itself, never to a test.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from rewardq.bench import add_bench_parser, make_items, run
from rewardq.broker.settings import Settings

_RATIOS = ("rewardq_over_asyncio", "rewardq_over_ideal", "sync_over_rewardq", "warm_ms",
           "per_item_over_batch")
_TIMED = ("sync", "asyncio", "rewardq", "rewardq_warm", "rewardq_dup", "rewardq_per_item",
          "rewardq_stream")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rewardq")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_bench_writes_every_phase_ratio_and_per_item_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = _parse(["bench", "--items", "64", "--latency-ms", "20", "--concurrency", "32",
                   "--workers", "2", "--repeats", "2", "--json", str(out)])

    assert run(args, Settings(chunk_size=16)) == 0

    report = json.loads(out.read_text())
    assert set(report["ratios"]) == set(_RATIOS)
    for key in _RATIOS:
        assert report["ratios"][key] > 0, key
    assert report["failed_items"] == 0
    phases = report["phases"]
    assert set(phases) == {"ideal", *_TIMED}
    assert phases["ideal"]["wall_s"] == pytest.approx(2 * 0.020)  # ceil(64 / 32) * 20 ms
    for name in _TIMED:
        assert phases[name]["wall_s"] > 0, name
        assert phases[name]["items_per_s"] > 0, name
        assert phases[name]["cpu_s_per_item"] > 0, name
    # Every cold item reached the judge once; the warm step reached it not at all; the
    # duplicates step judged each distinct pair once (64 - round(0.3 * 64) = 45).
    assert phases["asyncio"]["judge_requests"] == 64
    assert phases["rewardq"]["judge_requests"] == 64
    # The step's overhead: its wall less the longest in-worker scoring, a part of it.
    assert 0 < phases["rewardq"]["overhead_ms"] < phases["rewardq"]["wall_s"] * 1000
    assert phases["rewardq_warm"]["overhead_ms"] == 0  # nothing judged
    assert phases["rewardq_warm"]["judge_requests"] == 0
    assert phases["rewardq_dup"]["judge_requests"] == 45
    assert phases["rewardq_per_item"]["judge_requests"] == 64
    assert phases["rewardq_stream"]["judge_requests"] == 64
    assert report["config"]["per_process_concurrency"] == 16
    assert report["config"]["chunk_size"] == 16

    # Per-item awaits: every item ok, coalesced into about as many chunks as one submit.
    per_item, streaming = report["per_item"], report["streaming"]
    assert phases["rewardq_per_item"]["failed"] == 0
    assert phases["rewardq_per_item"]["items"] == 64
    expected = math.ceil(64 / 16)
    assert per_item["chunks_expected"] == expected
    assert per_item["batch_chunks"] == expected == phases["rewardq"]["chunks"]
    # Coalescing sends no more tasks than a batch would, give or take window splits.
    assert 1 <= per_item["chunks_sent"] <= expected + 8
    assert per_item["wall_s"] == phases["rewardq_per_item"]["wall_s"]
    assert per_item["batch_wall_s"] == phases["rewardq"]["wall_s"]
    assert per_item["ratio"] == pytest.approx(per_item["wall_s"] / per_item["batch_wall_s"])
    assert len(per_item["ratio_per_repeat"]) == 2
    assert all(r > 0 for r in per_item["ratio_per_repeat"])
    # The first result of a run cannot come after its last one.
    assert 0 < per_item["first_result_ms"] <= per_item["wall_s"] * 1000
    assert 0 < streaming["first_result_ms"] <= streaming["last_result_ms"]
    assert streaming["chunks"] == expected


def test_duplicate_items_repeat_content_under_their_own_ids() -> None:
    items = make_items(100, "n", duplicate_fraction=0.3)

    assert len({i["id"] for i in items}) == 100
    assert len({(i["prompt"], i["response"]) for i in items}) == 70
    assert not {i["prompt"] for i in items} & {i["prompt"] for i in make_items(10, "m")}
