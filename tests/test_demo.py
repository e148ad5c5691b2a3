"""``rewardq demo``: the main job runs, prints its table, and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path


def processes_with_marker(marker: str) -> list[int]:
    """PIDs whose environment carries ``marker`` (children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_until_gone(marker: str, limit_s: float = 30) -> list[int]:
    deadline = time.monotonic() + limit_s
    while (left := processes_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def demo(marker: str, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDQ_")}
    env["REWARDQ_DEMO_TEST_MARKER"] = marker
    return subprocess.Popen([sys.executable, "-m", "rewardq.cli", "demo", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_demo_prints_a_row_per_step_exits_0_and_leaves_nothing_running() -> None:
    marker = uuid.uuid4().hex
    proc = demo(marker, "--steps", "3", "--batch", "6", "--group", "4", "--latency-ms", "20",
                "--gpu-ms", "50", "--mode", "both")
    out, _ = proc.communicate(timeout=240)

    assert proc.returncode == 0, out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2"] * 2  # async table, then sync table
    assert all(r[1] == "24" and r[4] == "0" for r in rows)  # 24 items, none failed
    assert "GPU wait, sync / async" in out
    assert wait_until_gone(marker) == []


def test_ctrl_c_stops_the_demo_and_everything_it_started() -> None:
    marker = uuid.uuid4().hex
    proc = demo(marker, "--steps", "50", "--batch", "16", "--latency-ms", "200")
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # wait until the stack is up and a step ran
        seen.append(line)
        if line.strip().startswith("0 "):
            break
    assert len(processes_with_marker(marker)) >= 4, seen  # demo, redis, judge, workers
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)

    assert proc.returncode != 0
    assert wait_until_gone(marker) == []
