"""One import namespace: rewardq works from a training repository that has packages of its
own named like rewardq's components (``broker``, ``workers``, ``producer``, ``gateway``,
``monitoring``), since nothing of rewardq is imported by those bare names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rewardq.broker.settings import Settings
from rewardq.stack import settings_env, stop_process, wait_for_workers

CLASHING = ("broker", "workers", "producer", "gateway", "monitoring", "judge_server")
BIN = Path(sys.executable).parent


@pytest.fixture
def trainer_repo(tmp_path: Path) -> Path:
    """A folder holding packages of its own with rewardq's component names, each failing
    loudly if anything imports it."""
    for name in CLASHING:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ImportError('the training repository's own {name} package was imported')\n")
    (tmp_path / "broker.py").write_text("raise ImportError('broker.py was imported')\n")
    return tmp_path


def test_the_client_and_the_cli_ignore_the_folders_packages(trainer_repo: Path) -> None:
    code = ("from rewardq import RewardClient, AsyncRewardClient, Settings\n"
            "import rewardq.verl, rewardq.integrations.trl\n"
            "print(RewardClient.__module__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=trainer_repo, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "rewardq.producer.client"
    done = subprocess.run([str(BIN / "rewardq"), "--help"], cwd=trainer_repo,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: rewardq"), done.stderr


def test_a_worker_starts_from_that_folder(trainer_repo: Path, settings: Settings) -> None:
    worker = subprocess.Popen([str(BIN / "rewardq"), "worker", "--name", "clash@%h",
                               "--loglevel", "WARNING"], cwd=trainer_repo,
                              env=settings_env(settings), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        wait_for_workers(settings, ["clash"], processes=[worker], timeout_s=90)
    finally:
        worker.terminate()
        stop_process(worker, grace_s=15)
