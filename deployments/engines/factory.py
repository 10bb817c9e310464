"""Creates the engine a ModelConfig names (vLLM or simulated)."""

from __future__ import annotations

from collections.abc import Callable

from deployments.config import ModelConfig
from deployments.engines.base import Engine


def _create_vllm(model: ModelConfig) -> Engine:
    # Imported here: vLLM (and torch) load only in replicas that run it, never in the router.
    from deployments.engines.vllm import VLLMEngine

    return VLLMEngine(model)


def _create_simulated(model: ModelConfig) -> Engine:
    from deployments.engines.simulated import SimulatedEngine
    from deployments.tokenizer import load_tokenizer

    assert model.simulated is not None  # ModelConfig fills it for simulated engines
    tokenizer = load_tokenizer(model.tokenizer_source)
    return SimulatedEngine(
        model.simulated.resolved_profile(),
        seed=model.simulated.seed,
        detokenize=tokenizer.decode,
        vocab_size=tokenizer.vocab_size,
    )


ENGINE_FACTORIES: dict[str, Callable[[ModelConfig], Engine]] = {
    "vllm": _create_vllm,
    "simulated": _create_simulated,
}


def create_engine(model: ModelConfig) -> Engine:
    return ENGINE_FACTORIES[model.engine](model)
