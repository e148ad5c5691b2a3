"""The alert rules and the scrape config, checked by Prometheus' own ``promtool``.

``monitoring/alerts_test.yml`` holds a case for every alert (firing on data that should
fire it, silent on a healthy fleet). ``promtool`` comes with Debian's ``prometheus``
package; ``.ci/run`` installs it and sets ``REWARDQ_TEST_PROMTOOL=1``, which makes its
absence a failure instead of a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("REWARDQ_TEST_PROMTOOL") == "1":
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("no promtool (Debian's prometheus package); CI installs it")
    return found


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True,
                          timeout=120, check=False)


def test_alert_rules_are_valid_and_every_alert_has_a_test_case(promtool: str) -> None:
    checked = run(promtool, "check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    cases = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())
    tested = {t["alertname"] for case in cases["tests"] for t in case["alert_rule_test"]
              if t.get("exp_alerts")}
    assert alerts == tested, f"alerts without a firing case: {sorted(alerts - tested)}"


def test_alert_rule_unit_tests_pass(promtool: str) -> None:
    tested = run(promtool, "test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_shipped_scrape_config_checks_outside_the_container(promtool: str) -> None:
    checked = run(promtool, "check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
