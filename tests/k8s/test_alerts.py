"""The alert rules (k8s/base/alerts.yaml): rules promtool accepts, and `promtool test rules`
(alerts_test.yaml) for every alert. test_manifests.py validates the PrometheusRule in each
overlay; tests/integration/test_observability_cluster.py checks on a real cluster that the series
the rules read exist with these labels and that Prometheus evaluates every rule."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support import alert_rules_file

PROMTOOL_TESTS = Path(__file__).parent / "alerts_test.yaml"


def promtool(*args: str, cwd: Path) -> None:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make tools` installs it (Debian package prometheus)"
    result = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_on_its_condition_and_not_beside_it(tmp_path: Path) -> None:
    alert_rules_file(tmp_path)
    promtool("check", "rules", "rules.yml", cwd=tmp_path)
    shutil.copy(PROMTOOL_TESTS, tmp_path)
    promtool("test", "rules", PROMTOOL_TESTS.name, cwd=tmp_path)
    # Every alert has a test that expects it to fire.
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    rules = yaml.safe_load((tmp_path / "rules.yml").read_text())["groups"][0]["rules"]
    assert fired == {rule["alert"] for rule in rules}
