"""`inference-cluster` commands without Ray: the checks and shutdown paths around it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import k8s_render
from cluster.cli import EXIT_CONFIG, main

MODEL = {
    "name": "m",
    "engine": "simulated",
    "source": "/tmp/tok",
    "device": "cpu",
    "max_model_len": 1024,
}


def write_config(tmp_path: Path, **model: object) -> Path:
    path = tmp_path / "c.yaml"
    # A short deploy timeout: a `serve` that missed a stop request fails fast with exit 3.
    path.write_text(yaml.safe_dump({"models": [MODEL | model], "ray": {"deploy_timeout_s": 1}}))
    return path


def test_render_k8s_writes_paths_under_home_for_the_pods_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Loading the config expands `~` to the renderer's home; the pods have their own."""
    monkeypatch.setenv("HOME", "/home/alice")
    config = write_config(tmp_path, source="~/models/X", tokenizer="/home/alice/tok")
    assert main(["render-k8s", "--config", str(config)]) == 0
    patch = yaml.safe_load(capsys.readouterr().out)
    serve_config = yaml.safe_load(patch["spec"]["serveConfigV2"])
    model = serve_config["applications"][0]["args"]["models"][0]
    assert (model["source"], model["tokenizer"]) == ("~/models/X", "~/tok")


def test_render_k8s_without_the_repository_base_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed from a wheel there is no k8s/ folder: say so instead of a traceback."""
    monkeypatch.setattr(k8s_render, "BASE_RAYSERVICE", tmp_path / "k8s" / "rayservice.yaml")
    assert main(["render-k8s", "--config", str(write_config(tmp_path))]) == EXIT_CONFIG
    assert "checkout" in capsys.readouterr().err
