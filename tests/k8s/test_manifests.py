"""k8s/: the committed overlays are the generator's output, render with kubectl, and validate."""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster import dashboard, k8s_render
from cluster.config import ClusterConfig, load_config
from deployments.config import AppConfig
from tests.k8s.manifests import OVERLAYS, REPO, kustomize, validate

EXPECTED_KINDS = {
    "cpu-demo": ["ConfigMap", "PodMonitor", "PrometheusRule", "RayService"],
    "gpu": [
        "ConfigMap",
        "Job",
        "PersistentVolumeClaim",
        "PodMonitor",
        "PrometheusRule",
        "RayService",
    ],
}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_committed_overlay_is_what_the_generator_writes(overlay: str) -> None:
    config_path = OVERLAYS[overlay]
    expected = k8s_render.render_file(load_config(REPO / config_path), config_name=config_path)
    committed = (REPO / "k8s" / "overlays" / overlay / k8s_render.PATCH_FILE).read_text()
    assert committed == expected, (
        f"k8s/overlays/{overlay} is stale: run `inference-cluster render-k8s --config "
        f"{config_path} --out k8s/overlays/{overlay}`"
    )


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders_and_every_object_validates(overlay: str) -> None:
    objects = kustomize(overlay)
    assert sorted(o["kind"] for o in objects) == EXPECTED_KINDS[overlay]
    for obj in objects:
        checked_by = validate(obj)
        print(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: valid ({checked_by})")


def rayservice(overlay: str) -> dict[str, Any]:
    return next(o for o in kustomize(overlay) if o["kind"] == "RayService")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rayservice_shape(overlay: str) -> None:
    spec = rayservice(overlay)["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in str(head["template"])
    images = {c["image"] for g in [head, *cluster["workerGroupSpecs"]] for c in _containers(g)}
    variant = "cpu" if overlay == "cpu-demo" else "gpu"
    assert len(images) == 1 and images.pop().endswith(f"inference-cluster:0.1.0-{variant}")
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"dshm": "/dev/shm", "model-cache": "/models"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        secret = container["env"][0]["valueFrom"]["secretKeyRef"]
        assert (container["env"][0]["name"], secret["name"]) == ("HF_TOKEN", "hf-token")
        if overlay == "gpu":
            assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == (
                "inference-cluster-models"
            )
    # The serve config is one Serve accepts, and its args are an AppConfig.
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    (app,) = serve_config.applications
    assert (app.import_path, app.route_prefix) == ("deployments.app:build_app", "/")
    assert AppConfig.model_validate(app.args).models


def test_gpu_overlay_worker_groups_follow_the_config() -> None:
    groups = {
        g["groupName"]: g for g in rayservice("gpu")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    sizes = {
        name: (
            g["replicas"],
            g["minReplicas"],
            g["maxReplicas"],
            g["rayStartParams"]["num-gpus"],
            g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu"),
            g["template"]["spec"].get("nodeSelector"),
        )
        for name, g in groups.items()
    }
    h100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert sizes == {
        "router": (2, 2, 2, "0", None, None),
        # Autoscaled between 1 and 4 replicas: the Ray autoscaler adds and removes its pods.
        "llama-3-1-8b-instruct": (4, 1, 4, "1", "1", h100),
        "llama-3-1-70b-instruct": (1, 1, 1, "4", "4", h100),
    }


def _model(**fields: Any) -> dict[str, Any]:
    return {
        "name": "m",
        "engine": "simulated",
        "source": "/models/m",
        "max_model_len": 1024,
    } | fields


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # (replicas x pipeline stages) pods; tensor-parallel GPUs per pod; ceil of the CPUs one
        # stage's bundles reserve (+ the replica actor's on the first).
        (_model(), {"pods": 1, "gpus": "1", "cpus": "2", "memory": "64Gi"}),
        (
            _model(num_replicas=3, tensor_parallel_size=2),
            {"pods": 3, "gpus": "2", "cpus": "3", "memory": "128Gi"},
        ),
        (
            _model(num_replicas=2, tensor_parallel_size=4, pipeline_parallel_size=2),
            {"pods": 4, "gpus": "4", "cpus": "5", "memory": "256Gi"},
        ),
        (
            _model(device="cpu", num_replicas=2, cpus_per_worker=0.5, replica_cpus=0.25),
            {"pods": 2, "gpus": "0", "cpus": "1", "memory": "4Gi"},
        ),
    ],
)
def test_worker_group_sizing(model: dict[str, Any], expected: dict[str, Any]) -> None:
    config = ClusterConfig.model_validate({"models": [model]})
    base = yaml.safe_load(k8s_render.BASE_RAYSERVICE.read_text())
    router, group = k8s_render.render_patch(config, base)["spec"]["rayClusterConfig"][
        "workerGroupSpecs"
    ]
    assert router["groupName"] == "router" and group["groupName"] == "m"
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert {
        "pods": group["replicas"],
        "gpus": group["rayStartParams"]["num-gpus"],
        "cpus": group["rayStartParams"]["num-cpus"],
        "memory": resources["limits"]["memory"],
    } == expected
    assert (expected["gpus"] != "0") == ("nvidia.com/gpu" in resources["limits"])
    assert (expected["gpus"] != "0") == ("tolerations" in group["template"]["spec"])


def test_embedded_source_becomes_the_images_baked_model() -> None:
    config = load_config(REPO / OVERLAYS["cpu-demo"])
    (app,) = k8s_render.serve_config(config)["applications"]
    assert app["args"]["models"][0]["source"] == k8s_render.IMAGE_EMBEDDED_MODEL
    assert k8s_render.IMAGE_EMBEDDED_MODEL.startswith("~/.cache/inference-cluster/")
    # Where the config loads (the Serve controller's build task), `~` becomes that user's home.
    model = AppConfig.model_validate(app["args"]).models[0]
    assert model.source == os.path.expanduser(k8s_render.IMAGE_EMBEDDED_MODEL)
    assert model.source.startswith(os.path.expanduser("~") + "/")


def test_autoscaled_models_are_not_capped_at_the_nodes_there_are() -> None:
    """Ray's autoscaler adds worker pods only for replicas Serve asked for and could not place:
    capped at the free resources, an autoscaled model never grew past its first pods."""
    config = load_config(REPO / OVERLAYS["gpu"])
    (app,) = k8s_render.serve_config(config)["applications"]
    models = AppConfig.model_validate(app["args"]).models
    autoscaled = [m for m in models if m.autoscaling.enabled]
    assert autoscaled and not any(m.autoscaling.cap_at_free_resources for m in autoscaled)
    assert all(m.autoscaling.cap_at_free_resources for m in config.models)  # a local Ray's


@pytest.mark.parametrize(
    ("where", "break_it"),
    [
        ("RayService unknown field", lambda o: o["spec"]["rayClusterConfig"].update(gpus=1)),
        (
            "RayService worker group without groupName",
            lambda o: o["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),
        ),
        (
            "pod template with a misspelt container field",
            lambda o: o["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
                "containers"
            ][0].update(imagePullPolice="Always"),
        ),
        (
            "serveService port as text",
            lambda o: o["spec"]["serveService"]["spec"]["ports"][0].update(port="8000"),
        ),
    ],
)
def test_validation_catches_mistakes(where: str, break_it: Any) -> None:
    broken = copy.deepcopy(rayservice("cpu-demo"))
    break_it(broken)
    with pytest.raises(Exception):  # noqa: B017 (jsonschema's and kubernetes_validate's errors)
        validate(broken)


def test_pods_on_a_model_claim_wait_for_the_download_to_complete() -> None:
    """Started before the weights were there, the router's and engines' constructors failed,
    Serve gave up on the deployment and KubeRay never re-submitted it: the gpu overlay's pods
    now wait for the file its download Job writes last. Baked-in weights wait for nothing."""
    gpu = kustomize("gpu")
    groups = next(o for o in gpu if o["kind"] == "RayService")["spec"]["rayClusterConfig"]
    for group in groups["workerGroupSpecs"]:
        (wait,) = group["template"]["spec"]["initContainers"]
        assert k8s_render.MODELS_READY_FILE in wait["command"][-1], group["groupName"]
        assert wait["volumeMounts"][0]["name"] == "model-cache"
        assert wait["image"] == group["template"]["spec"]["containers"][0]["image"]
    job = next(o for o in gpu if o["kind"] == "Job")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert (
        script.rstrip()
        .splitlines()[-1]
        .startswith(f'Path("{k8s_render.MODELS_READY_FILE}").write_text')
    )
    demo = rayservice("cpu-demo")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert not any("initContainers" in g["template"]["spec"] for g in demo)


def test_podmonitor_validation_catches_an_unknown_field() -> None:
    monitor = next(o for o in kustomize("cpu-demo") if o["kind"] == "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["scrapeInterval"] = "15s"
    with pytest.raises(AssertionError, match="fields its CRD does not know"):
        validate(monitor)


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def test_every_legend_names_labels_its_query_keeps() -> None:
    """Grafana fills {{label}} from the series' labels and prints anything else as is: a
    "{{deployment, policy}}" titled every routing series with that text."""
    for title, expr, legend in (
        (panel["title"], target["expr"], target["legendFormat"])
        for panel in dashboard.dashboard()["panels"]
        for target in panel["targets"]
    ):
        kept = {
            label.strip()
            for group in re.findall(r"by \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        for label in re.findall(r"\{\{(.*?)\}\}", legend):
            assert label in kept, (title, legend, expr)


def test_committed_dashboard_is_what_the_generator_writes() -> None:
    committed = dashboard.DASHBOARD_FILE.read_text()
    assert committed == dashboard.render(), (
        f"{dashboard.DASHBOARD_FILE} is stale: run `inference-cluster dashboard --out` on it"
    )
    # The ConfigMap carries that same JSON.
    config_map = next(o for o in kustomize("cpu-demo") if o["kind"] == "ConfigMap")
    assert json.loads(config_map["data"]["inference-cluster.json"]) == dashboard.dashboard()
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
