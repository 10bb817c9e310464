"""The k8s/ overlays as kubectl renders them, and offline validators for every kind they hold."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).parents[2]
# shared/k8s-schemas beside the repo (DESIGN.md; beside a worktree's parent folder too): KubeRay's
# CRDs as the operator installs them.
CRD_DIR = next(
    (p / "shared" / "k8s-schemas" for p in REPO.parents if (p / "shared" / "k8s-schemas").is_dir()),
    REPO.parent / "shared" / "k8s-schemas",
)
# The oldest Kubernetes minor the manifests must stay valid for: README's "kubectl 1.27+" (KubeRay
# 1.x supports >= 1.27). kubernetes-validate bundles each minor's schemas: no network.
KUBERNETES_VERSION = "1.27.0"
# Overlay -> the ClusterConfig it is rendered from.
OVERLAYS = {
    "cpu-demo": "cluster/configs/local.yaml",
    "gpu": "cluster/configs/gpu-node.yaml",
}


def kustomize(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects as `kubectl kustomize` renders them (fresh copies on every call)."""
    return [doc for doc in yaml.safe_load_all(_kustomize_text(overlay)) if doc]


@cache
def _kustomize_text(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make tools` installs it (see the Makefile)"
    result = subprocess.run(
        [kubectl, "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@cache
def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            for served in crd["spec"]["versions"]:
                if served["name"] == version:
                    schema = served["schema"]["openAPIV3Schema"]
                    _reject_unknown_fields(schema)
                    return schema
    raise LookupError(f"no CRD for {kind} {api_version} in {CRD_DIR}")


def validate(obj: dict[str, Any]) -> str:
    """Validate one object against its schema; raise on any error. Returns what checked it."""
    kind, api_version = obj["kind"], obj["apiVersion"]
    if api_version.startswith("ray.io/"):
        jsonschema.validate(obj, crd_schema(kind, api_version), cls=jsonschema.Draft7Validator)
        # The CRD leaves metadata open; the embedded Service and pod templates are checked
        # against Kubernetes' own schemas too.
        _validate_embedded(obj)
        return f"CRD {kind} {api_version} (../shared/k8s-schemas)"
    if api_version == "monitoring.coreos.com/v1" and kind in ("PodMonitor", "PrometheusRule"):
        from cloudcoil.models.prometheus_operator import v1

        parsed = (
            getattr(v1, kind)
            .model_validate(obj)
            .model_dump(by_alias=True, exclude_unset=True, mode="json")
        )
        # The models ignore unknown fields: a field lost in the round trip is a typo.
        assert parsed == obj, f"{kind} has fields its CRD does not know: {parsed} != {obj}"
        return "Prometheus Operator CRD models (cloudcoil)"
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    return f"Kubernetes {KUBERNETES_VERSION} OpenAPI (strict)"


def _validate_embedded(obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    cluster = spec.get("rayClusterConfig", spec)
    if "serveService" in spec:
        service = {"apiVersion": "v1", "kind": "Service", **spec["serveService"]}
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        kubernetes_validate.validate({**pod, "template": template}, KUBERNETES_VERSION, strict=True)


def _reject_unknown_fields(schema: dict[str, Any]) -> None:
    """The API server prunes fields a structural CRD schema does not name (silently dropping a
    misspelt one): make such fields errors here, except where the schema keeps unknown fields."""
    if schema.get("type") == "object" and "properties" in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        for child in schema["properties"].values():
            _reject_unknown_fields(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _reject_unknown_fields(schema[key])
