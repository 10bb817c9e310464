"""The anchor (Ray Serve LLM with PrefixCacheAffinityRouter) on real vLLM CPU engines.

It pins what `loadtest` needs from the anchor to compare fairly: `ignore_eos` gives exactly
max_tokens, and usage reports cached prompt tokens. Prompts are text: this router never answers a
token-id prompt (see loadtest/anchors/ray_serve_llm.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import ray
from ray import serve

from loadtest.anchors.ray_serve_llm import APP_NAME, build_anchor_app, our_default
from tests.integration.conftest import free_port

pytestmark = pytest.mark.e2e
MODEL = "anchor-llama"  # not our default id, so the test also shows --model-id is honoured


@pytest.fixture(scope="module")
def anchor() -> Iterator[str]:
    """The prefix-affinity anchor on a fresh local Ray, as many replicas as ours; its base URL."""
    _, model = our_default()
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_anchor_app(
            "prefix-affinity",
            replicas=model.num_replicas,
            num_gpu_blocks=model.engine_options["num_gpu_blocks_override"],
            model_id=MODEL,
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ignore_eos_and_cached_tokens(anchor: str) -> None:
    client = openai.OpenAI(base_url=f"{anchor}/v1", api_key="unused", max_retries=0, timeout=120)

    short = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=48, extra_body={"ignore_eos": True}
    )
    assert short.usage is not None and short.usage.completion_tokens == 48
    assert short.choices[0].finish_reason == "length"

    # Several KV blocks (128 tokens each) long, so a repeat can reuse whole cached blocks.
    long_prompt = " ".join(["the router sends each prompt to the replica that cached it"] * 60)
    cached = []
    for _ in range(3):
        result = client.completions.create(
            model=MODEL, prompt=long_prompt, max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert result.usage is not None and result.usage.prompt_tokens > 2 * 128
        details = result.usage.prompt_tokens_details
        assert details is not None, "prompt_tokens_details missing: enable_prompt_tokens_details"
        cached.append(details.cached_tokens)
    # The first sight of the prompt computes it; affinity sends the repeats to the replica that
    # holds it, so both are cache hits (pow2 could send the second one to the other replica).
    assert cached[0] == 0
    assert cached[1] > 0 and cached[2] > 0, cached
