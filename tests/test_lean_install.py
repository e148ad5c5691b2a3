"""``pip install rewardq[worker]`` into a fresh venv: no torch, and a worker that scores.

A worker host needs neither torch nor transformers (those are the trainer's,
``rewardq[trainer]``). This builds a fresh virtual environment from this checkout with
the exact versions of ``constraints.txt``, checks that no torch came with it, starts a
worker from it against the suite's Redis and judge, and scores items through it with
``rewardq submit`` from the same lean environment.

It installs a few dozen packages (about a minute from pip's cache), so it runs where
``REWARDQ_TEST_LEAN_INSTALL=1`` asks for it; ``.ci/run`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scoring_data import expected, make_items

from rewardq.broker.settings import Settings
from rewardq.stack import JudgeProcess, settings_env, stop_process, wait_for_workers

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.environ.get("REWARDQ_TEST_LEAN_INSTALL") != "1",
                                reason="REWARDQ_TEST_LEAN_INSTALL=1 asks for it (CI does)")


@pytest.mark.timeout(900)
def test_a_worker_installed_lean_has_no_torch_and_scores(
        tmp_path: Path, settings: Settings, judge: JudgeProcess) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), f"{ROOT}[worker]"],
                   check=True, cwd=tmp_path, timeout=800)
    python = str(venv / "bin" / "python")
    listed = subprocess.run([python, "-m", "pip", "list", "--format", "json"],
                            check=True, capture_output=True, text=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert not names & {"torch", "transformers", "tokenizers", "numpy"}, sorted(names)
    assert {"celery", "gevent", "openai", "rewardq"} <= names

    env = settings_env(settings, {"PYTHONPATH": ""})
    worker = subprocess.Popen([str(venv / "bin" / "rewardq"), "worker", "--name", "lean@%h",
                               "--loglevel", "WARNING"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_workers(settings, ["lean"], processes=[worker])
        items = make_items(50, "lean")
        source = tmp_path / "items.jsonl"
        source.write_text("".join(json.dumps(i) + "\n" for i in items))
        done = subprocess.run([str(venv / "bin" / "rewardq"), "submit", str(source),
                               "--timeout", "120"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        results = [json.loads(line) for line in done.stdout.splitlines()]
        assert [(r["score"], r["raw_score"]) for r in results] == [expected(i) for i in items]
    finally:
        worker.terminate()
        stop_process(worker, grace_s=15)
