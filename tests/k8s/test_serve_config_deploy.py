"""The cpu-demo overlay's serveConfigV2, exactly as kubectl renders it, deploys on a local Ray the
way KubeRay deploys it (a PUT to the dashboard's Serve REST API) and answers the openai client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import ray
import yaml
from ray import serve
from ray._private.authentication.http_token_authentication import (
    get_auth_headers_if_auth_enabled,
)

from cluster.embedded_model import ensure_embedded_model
from tests.integration.conftest import free_port
from tests.k8s.manifests import kustomize

pytestmark = pytest.mark.e2e

DEPLOY_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def dashboard() -> Iterator[str]:
    # The rendered source is `~/.cache/inference-cluster/...`, where the CPU image bakes the
    # model for user ray; here it is this user's default cache.
    ensure_embedded_model(Path("~/.cache/inference-cluster").expanduser())
    port = free_port()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_port=port,
        logging_level="ERROR",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_rendered_serve_config_deploys_and_answers(dashboard: str) -> None:
    rayservice = next(o for o in kustomize("cpu-demo") if o["kind"] == "RayService")
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    port = serve_config["http_options"]["port"]

    # A local ray.init() turns Ray's token auth on; KubeRay's operator sends its token the same way.
    headers = get_auth_headers_if_auth_enabled({})
    with httpx.Client(base_url=dashboard, headers=headers, timeout=30) as client:
        response = client.put("/api/serve/applications/", json=serve_config)
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            details = client.get("/api/serve/applications/").json()
            status = details["applications"].get(app["name"], {}).get("status")
            assert status not in ("DEPLOY_FAILED", "UNHEALTHY"), details["applications"]
            if status == "RUNNING":
                break
            time.sleep(2)
        assert status == "RUNNING", f"not running after {DEPLOY_TIMEOUT_S} s: {status}"

    model = app["args"]["models"][0]["name"]
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    reply = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    assert reply.model == model
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
