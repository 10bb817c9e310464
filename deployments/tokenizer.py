"""The router's tokenizer: chat template and prompt -> token ids, exactly as the engine would.

The router tokenizes once and sends token ids, so it sees the same token blocks the engine caches.
Only local folders are loaded: this project never fetches from a model hub at run time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from deployments.api.errors import bad_request
from deployments.observability.tracing import traced_tokenization

# Hub look-ups would hang on machines without network; every source here is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@lru_cache(maxsize=8)
def load_tokenizer(source: str) -> Any:
    """A transformers fast tokenizer from a local folder (cached per process)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(source):
        raise FileNotFoundError(f"tokenizer folder {source!r} does not exist")
    return AutoTokenizer.from_pretrained(source)


class PromptTokenizer:
    """Turns API prompts into engine token ids for one model."""

    def __init__(self, source: str) -> None:
        self._tokenizer = load_tokenizer(source)

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """The tokenizer's chat template (transformers keeps several as a dict by name)."""
        return self._tokenizer.chat_template

    @traced_tokenization("text")
    def encode_text(self, text: str) -> list[int]:
        # Completions add the model's special prefix (BOS), as vLLM's completions endpoint does.
        return list(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    @traced_tokenization("chat")
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        try:
            rendered = self._tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja raises for conversations the template refuses
            message = f"messages: the chat template refused them: {exc}"
            raise bad_request(message, "messages") from None
        # The template already contains the special tokens; adding them again would double BOS.
        return list(self._tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)
