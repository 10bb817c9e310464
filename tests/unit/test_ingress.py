"""The ingress settings as Ray's HAProxy ingress turns them into HAProxy's configuration.

Ray reads them from the environment when Serve is imported, so a fresh interpreter with our
environment renders Ray's own template (ray/serve/_private/haproxy.py) and HAProxy (the binary
Ray would start) checks the file: a Ray upgrade that renders `retry-on` differently fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster import ingress
from cluster.config import IngressConfig

_RENDER = """
import sys
from ray.serve._private.haproxy import (
    BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig, get_haproxy_binary,
)
folder = sys.argv[1]
config = HAProxyConfig(
    socket_path=f"{folder}/admin.sock",
    server_state_base=folder,
    server_state_file=f"{folder}/server-state",
    metrics_socket_path=f"{folder}/metrics.sock",
)
router = ServerConfig(name="router-1", host="127.0.0.1", port=30000)
backend = BackendConfig(name="http-app", path_prefix="/", servers=[router], app_name="app")
api = HAProxyApi(config, {backend.name: backend}, f"{folder}/haproxy.cfg")
api._generate_config_file_internal()
print(get_haproxy_binary())
"""


def render_ray_haproxy_config(env: dict[str, str], folder: Path) -> tuple[str, str]:
    """(the haproxy.cfg Ray writes under `env`, the binary Ray would run)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    done = subprocess.run(
        [sys.executable, "-c", _RENDER, str(folder)],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
    )
    binary = done.stdout.strip().splitlines()[-1]
    return (folder / "haproxy.cfg").read_text(), binary


def section(config: str, name: str) -> list[str]:
    """The stripped lines of the first section called `name` (e.g. `defaults`)."""
    lines: list[str] = []
    inside = False
    for line in config.splitlines():
        if line and not line[0].isspace():
            if inside:
                break
            inside = line.strip() == name
        elif inside and line.strip():
            lines.append(line.strip())
    return lines


def test_the_python_proxy_needs_no_environment() -> None:
    assert ingress.ray_env(IngressConfig(haproxy=False)) == {}


def test_ray_renders_our_retries_into_a_config_haproxy_accepts(tmp_path: Path) -> None:
    config = IngressConfig(
        retries=2, max_retried_body_bytes=128 * 1024, request_receive_timeout_s=30
    )
    text, binary = render_ray_haproxy_config(ingress.ray_env(config), tmp_path)

    defaults = section(text, "defaults")
    assert "retry-on conn-failure empty-response" in defaults
    assert "retries 2" in defaults
    assert "option redispatch 1" in defaults  # Ray's: each retry goes to another replica
    # Without it HAProxy drops its copy of a request whose body came after its headers.
    assert "option http-buffer-request" in defaults
    assert "timeout http-request 30s" in defaults  # a stalled upload holds no connection for long
    assert "tune.bufsize 131072" in section(text, "global")

    check = subprocess.run(
        [binary, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
