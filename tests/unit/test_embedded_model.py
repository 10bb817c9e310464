"""The embedded model generator: deterministic, atomic, and its tokenizer is usable as is."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cluster import embedded_model
from cluster.embedded_model import (
    COMPLETE_MARKER,
    IM_END,
    IM_START,
    MODEL_DIR_NAME,
    ensure_embedded_model,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built_twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # About 6 s per build: build each root once for the whole module.
    return (
        ensure_embedded_model(tmp_path_factory.mktemp("first")),
        ensure_embedded_model(tmp_path_factory.mktemp("second")),
    )


@pytest.fixture(scope="module")
def tokenizer(built_twice: tuple[Path, Path]) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(built_twice[0])


def test_two_builds_write_identical_files(built_twice: tuple[Path, Path]) -> None:
    first, second = built_twice
    assert first.name == second.name == MODEL_DIR_NAME
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER} <= set(names)
    for name in names:
        assert _sha256(first / name) == _sha256(second / name), name


def test_marker_records_the_hash_of_every_file(built_twice: tuple[Path, Path]) -> None:
    folder = built_twice[0]
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    files = {p.name: _sha256(p) for p in folder.iterdir() if p.name != COMPLETE_MARKER}
    assert marker["sha256"] == files


def test_config_fits_vllm_cpu(built_twice: tuple[Path, Path]) -> None:
    config = json.loads((built_twice[0] / "config.json").read_text())
    # vLLM CPU has no attention kernel for head_dim 16; 64 works (DESIGN.md).
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert 1000 <= config["vocab_size"] <= 8192
    assert config["max_position_embeddings"] >= 2048


def test_complete_folder_is_reused_without_building(
    built_twice: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(folder: Path) -> None:
        raise AssertionError("rebuilt a complete model")

    monkeypatch.setattr(embedded_model, "_build", fail)
    assert ensure_embedded_model(built_twice[0].parent) == built_twice[0]


def test_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded_model, "_build", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_embedded_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []

    def slow_build(folder: Path) -> None:
        builds.append(folder)
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        (folder / embedded_model.COMPLETE_MARKER).write_text("{}")

    monkeypatch.setattr(embedded_model, "_build", slow_build)
    results: list[Path] = []
    # flock conflicts between separate open()s even within one process, so threads exercise it.
    callers = [
        threading.Thread(target=lambda: results.append(ensure_embedded_model(tmp_path)))
        for _ in range(3)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()

    assert len(builds) == 1
    assert results == [tmp_path / MODEL_DIR_NAME] * 3


def test_cache_dir_defaults_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(embedded_model.CACHE_ENV, str(tmp_path))
    assert embedded_model.default_cache_dir() == tmp_path


@pytest.mark.parametrize(
    "text",
    [
        "The router sends each request to the replica that holds its prefix.",
        "Ünïcödé, emoji 🚀, tabs\tand\nnewlines, 12345, {json: [1, 2]}",
        "",
    ],
)
def test_tokenizer_round_trips_text(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_has_chat_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.eos_token == IM_END
    for special in (IM_START, IM_END):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1
    assert 1000 <= len(tokenizer) <= 8192


def test_chat_template_is_chatml(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tokenizer.eos_token_id) == 2
