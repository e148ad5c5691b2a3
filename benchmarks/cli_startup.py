"""How long the console script takes to start: ``rewardq --help`` and friends.

Operators run ``rewardq stats`` and ``rewardq failed ...`` by hand; they should answer
at once. Median of 5 runs each, as subprocesses (so imports are measured cold for the
interpreter, warm for the OS file cache). Not a test: a figure for the issue notes.

    .venv/bin/python benchmarks/cli_startup.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 5
COMMANDS = [["--help"], ["stats", "--help"], ["failed", "list", "--help"],
            ["submit", "--help"], ["worker", "--help"]]


def main() -> int:
    script = Path(sys.executable).with_name("rewardq")
    print(f"{'command':<32} {'median s':>9} {'max s':>7}")
    for args in COMMANDS:
        times = []
        for _ in range(RUNS):
            started = time.perf_counter()
            subprocess.run([str(script), *args], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - started)
        print(f"{'rewardq ' + ' '.join(args):<32} {statistics.median(times):>9.2f} "
              f"{max(times):>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
