"""Screenshot Flower's dashboard with live workers, for the docs and the issue notes.

Starts the local stack (embedded Redis, the local judge, worker processes), starts Flower
with basic auth on loopback, waits until Flower receives every worker's heartbeats (so
it sees every task event that follows), runs a scoring job, and has headless Chromium
take a PNG of a Flower page. Everything it started is stopped on exit.

    python -m rewardq.screenshot_flower --out flower.png [--workers 3] [--items 600]

Needs Chromium (``apt-get install -y chromium`` on Debian).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from rewardq.broker.embedded import free_port
from rewardq.broker.errors import RewardqError
from rewardq.broker.settings import Settings
from rewardq.flower import FlowerOptions, FlowerProcess, start_flower
from rewardq.producer.client import RewardClient
from rewardq.stack import LocalStack

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
USER, PASSWORD = "rewardq", "screenshot"


def find_browser() -> str:
    """Path of a Chromium-family browser.

    Raises:
        RewardqError: none is installed.
    """
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise RewardqError("no Chromium found: install it (apt-get install -y chromium)")


def screenshot(url: str, out: Path, *, browser: str, width: int = 1400,
               height: int = 900) -> None:
    """Save a PNG of ``url`` as headless Chromium renders it.

    Raises:
        RewardqError: Chromium failed or wrote no file.
    """
    with tempfile.TemporaryDirectory(prefix="rewardq-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={out}",
               f"--window-size={width},{height}", "--virtual-time-budget=5000", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.exists():
        raise RewardqError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")


def arithmetic_items(n: int) -> list[dict[str, Any]]:
    """``n`` distinct arithmetic items, half answered right, all with a reference."""
    items = []
    for i in range(n):
        a, b = i % 89, i // 89
        answer = a + b if i % 2 == 0 else a + b + 1
        items.append({"id": f"shot-{i}", "prompt": f"What is {a} + {b}?",
                      "response": f"The answer is {answer}.", "reference": str(a + b),
                      "uid": f"shot-g{i // 8}"})
    return items


def wait_until_online(flower: FlowerProcess, workers: int, timeout_s: float = 60) -> None:
    """Wait until Flower has a heartbeat from ``workers`` workers.

    Raises:
        RewardqError: not all seen within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if flower.get("/metrics").text.count("flower_worker_online{") >= workers:
            return
        time.sleep(0.2)
    raise RewardqError(f"Flower did not see {workers} workers within {timeout_s}s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m rewardq.screenshot_flower``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(tempfile.gettempdir()) / "rewardq-flower-dashboard.png")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="local judge latency")
    parser.add_argument("--page", default="/workers", help="Flower page to capture")
    args = parser.parse_args(argv)

    browser = find_browser()
    settings = Settings(chunk_size=16)
    with tempfile.TemporaryDirectory(prefix="rewardq-screenshot-") as tmp, \
            LocalStack(settings, workers=args.workers, judge_latency_ms=args.latency_ms,
                       log_dir=Path(tmp)) as stack:
        options = FlowerOptions(port=free_port(), user=USER, password=SecretStr(PASSWORD))
        with start_flower(stack.settings, options, log_file=Path(tmp) / "flower.log") as flower:
            wait_until_online(flower, args.workers)
            with RewardClient(stack.settings) as client:
                pending = client.submit(arithmetic_items(args.items), step=1)
                results = pending.result(timeout=300)
            ok = sum(r.status.value == "ok" for r in results)
            print(f"scored {ok}/{len(results)} items in {pending.chunk_count} chunks",
                  file=sys.stderr)
            time.sleep(1.0)  # the last task-succeeded events reach Flower
            url = flower.url.replace("://", f"://{USER}:{PASSWORD}@", 1) + args.page
            args.out.parent.mkdir(parents=True, exist_ok=True)
            screenshot(url, args.out, browser=browser)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
