"""``rewardq bench`` end to end on a tiny step: untimed, it checks the report's shape.

Every number a timing produces is only checked to be there and positive; how fast
anything is belongs to the benchmark itself, never to a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from broker.settings import Settings
from rewardq.bench import add_bench_parser, make_items, run

_RATIOS = ("rewardq_over_asyncio", "rewardq_over_ideal", "sync_over_rewardq", "warm_ms")
_TIMED = ("sync", "asyncio", "rewardq", "rewardq_warm", "rewardq_dup")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rewardq")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_bench_writes_every_phase_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = _parse(["bench", "--items", "64", "--latency-ms", "20", "--concurrency", "32",
                   "--workers", "2", "--repeats", "1", "--json", str(out)])

    assert run(args, Settings()) == 0

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
    assert phases["rewardq_warm"]["judge_requests"] == 0
    assert phases["rewardq_dup"]["judge_requests"] == 45
    assert report["config"]["per_process_concurrency"] == 16


def test_duplicate_items_repeat_content_under_their_own_ids() -> None:
    items = make_items(100, "n", duplicate_fraction=0.3)

    assert len({i["id"] for i in items}) == 100
    assert len({(i["prompt"], i["response"]) for i in items}) == 70
    assert not {i["prompt"] for i in items} & {i["prompt"] for i in make_items(10, "m")}
