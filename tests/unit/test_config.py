"""ClusterConfig loading and validation: good files load, bad ones name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.config import ConfigError, load_config

CONFIGS = Path(__file__).parents[2] / "cluster" / "configs"
SIMULATED_MODEL = {
    "name": "m",
    "engine": "simulated",
    "source": "/tmp/tok",
    "device": "cpu",
    "max_model_len": 1024,
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["local.yaml", "simulated.yaml", "gpu-node.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.models


def test_defaults_fill_in(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"models": [SIMULATED_MODEL]}))
    model = config.models[0]
    assert config.http.port == 8000
    assert model.simulated is not None and model.simulated.profile == "llama-8b-h100"
    assert model.num_workers == 1


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"tensor_parallel_size": 0}, "models.0.tensor_parallel_size", "greater than 0"),
        ({"engine": "tgi"}, "models.0.engine", "'vllm' or 'simulated'"),
        ({"max_model_len": None}, "models.0.max_model_len", "valid integer"),
        ({"typo_field": 1}, "models.0.typo_field", "Extra inputs are not permitted"),
        ({"name": "bad name!"}, "models.0.name", "should match pattern"),
        ({"simulated": {"profile": "nope"}}, "models.0.simulated.profile", "unknown profile"),
        ({"engine_options": {"max_num_seqs": 4}}, "models.0", "engine: vllm only"),
        ({"pipeline_parallel_size": 2}, "models.0", "GPU-only"),
        # The policy would size for batches Serve never lets a replica reach.
        (
            {"max_ongoing_requests": 8, "autoscaling": {"enabled": True}},
            "models.0",
            "target_per_replica (16) is above max_ongoing_requests (8)",
        ),
        # Routing parameters are the policy's: checked when the config loads, not when Serve
        # first routes a request (a typo once deployed and then failed every request).
        (
            {"routing": {"params": {"spill_sigma": 2}}},
            "models.0.routing.params",
            "'cache_load': spill_sigma: Extra inputs are not permitted",
        ),
        (
            {"routing": {"params": {"max_index_blocks": 0}}},
            "models.0.routing.params",
            "max_index_blocks: Input should be greater than or equal to 1",
        ),
        (
            {"routing": {"policy": "pow2", "params": {"policy": "round_robin"}}},
            "models.0.routing.params",
            "'pow2': policy: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_model_fields_are_named(
    tmp_path: Path, change: dict[str, object], field: str, message: str
) -> None:
    model = {**SIMULATED_MODEL, **change}
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, {"models": [model]}))
    text = str(error.value)
    assert f"{field}:" in text, text
    assert message in text, text


def test_an_autoscaled_router_sizes_within_its_max_ongoing_requests(tmp_path: Path) -> None:
    router = {"max_ongoing_requests": 128, "autoscaling": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"target_per_replica \(256\) is above max_ongoing"):
        load_config(write(tmp_path, {"models": [SIMULATED_MODEL], "router": router}))
    router["autoscaling"]["target_per_replica"] = 128
    load_config(write(tmp_path, {"models": [SIMULATED_MODEL], "router": router}))


def test_routing_params_reach_the_router_as_the_policy_s_own(tmp_path: Path) -> None:
    """In their own argument: a parameter can never replace the policy's name or seed."""
    from deployments.app import build_app

    routing = {"policy": "cache_load", "seed": 3, "params": {"spill_sigmas": 2.5}}
    config = load_config(write(tmp_path, {"models": [{**SIMULATED_MODEL, "routing": routing}]}))
    router = build_app(config.app_config())._bound_deployment
    (server,) = router.init_args[1].values()  # the model's LLMServer application
    router_config = server._bound_deployment._deployment_config.request_router_config
    kwargs = router_config.request_router_kwargs
    assert (kwargs["policy"], kwargs["seed"]) == ("cache_load", 3)
    assert kwargs["params"] == {"spill_sigmas": 2.5}


def test_vllm_options_owned_by_fields_are_refused(tmp_path: Path) -> None:
    model = {**SIMULATED_MODEL, "engine": "vllm", "engine_options": {"tensor_parallel_size": 2}}
    with pytest.raises(ConfigError, match="set by the model's field `tensor_parallel_size`"):
        load_config(write(tmp_path, {"models": [model]}))


def test_duplicate_model_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repeated: \\['m'\\]"):
        load_config(write(tmp_path, {"models": [SIMULATED_MODEL, SIMULATED_MODEL]}))


@pytest.mark.parametrize(
    ("content", "message"),
    [("- just\n- a list\n", "top level must be a mapping"), ("models: [\n", "not valid YAML")],
)
def test_unreadable_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text((CONFIGS / "simulated.yaml").read_text(), encoding="utf-16")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


def test_cli_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(CONFIGS / "simulated.yaml")]) == 0
    bad = write(tmp_path, {"models": [{**SIMULATED_MODEL, "num_replicas": -1}]})
    assert main(["config", "validate", str(bad)]) == 2
    assert "models.0.num_replicas" in capsys.readouterr().err
    assert main(["config", "validate", str(tmp_path / "missing.yaml")]) == 2


def test_a_stopped_router_waits_for_its_requests_deadline(tmp_path: Path) -> None:
    """A router replica Serve stops (scale-down, rolling update) cut its streams after 60 s
    where a model's replicas drain for minutes; by default it now waits as long as a request
    may live, and Serve stops it as soon as its last request ends."""
    from deployments.app import build_app

    config = load_config(write(tmp_path, {"models": [SIMULATED_MODEL]}))
    router = build_app(config.app_config())._bound_deployment  # Serve's Router deployment
    assert router._deployment_config.graceful_shutdown_timeout_s == 600.0
    assert config.router.request_timeout_s == 600.0
    router_fields = {"request_timeout_s": 120, "graceful_shutdown_timeout_s": 30}
    config = load_config(write(tmp_path, {"models": [SIMULATED_MODEL], "router": router_fields}))
    assert config.router.shutdown_timeout() == 30
    del router_fields["graceful_shutdown_timeout_s"]
    config = load_config(write(tmp_path, {"models": [SIMULATED_MODEL], "router": router_fields}))
    assert config.router.shutdown_timeout() == 120
