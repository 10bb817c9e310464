"""Hypothesis strategies of hostile and broken API requests, and what every answer must satisfy.

Shared by the in-process fuzz test (tests/unit/test_fuzz_api.py) and the one against the real
HTTP server (tests/integration/test_fuzz_http.py). Requests start from a valid one and replace
some fields with anything JSON can carry (huge and negative numbers, NaN and Infinity, unpaired
surrogate escapes, wrong types, nested containers), so most reach deep validation paths instead
of failing at the first field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import strategies as st

from tests.support import parse_sse

CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"

# Every category, surrogates (Cs) included: json.dumps escapes them as \ud800, which is valid
# JSON that no tokenizer can encode.
# Strings that broke servers before: unpaired surrogates, NUL, bidi overrides, emoji.
NASTY_STRINGS = ["\ud800", "a\udfffb", "\x00", "\u202e", "\U0001f642", "\ufeff", " " * 3000]
any_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()), max_size=24
) | st.sampled_from(NASTY_STRINGS)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Values near the valid ranges, so sampling, context and limit checks are reached too.
near_valid = (
    st.integers(min_value=-3, max_value=1100)
    | st.floats(min_value=-3, max_value=3)
    | st.booleans()
    | st.lists(st.integers(min_value=-2, max_value=5000), max_size=6)
    | st.sampled_from(["", "text", "json_object", "user", "\n", "stop", "x" * 2000])
)
field_values = json_values | near_valid

message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "bot"])
        | json_values,
        "content": any_text
        | st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "image_url"]), "text": any_text}
            )
        )
        | json_values,
    }
)

SHARED_FIELDS = [
    "model", "temperature", "top_p", "top_k", "n", "seed", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "ignore_eos", "stream", "stream_options", "user",
    "logit_bias", "max_tokens",
]  # fmt: skip
CHAT_FIELDS = [
    *SHARED_FIELDS, "messages", "max_completion_tokens", "logprobs", "top_logprobs",
    "response_format", "tools",
]  # fmt: skip
COMPLETION_FIELDS = [*SHARED_FIELDS, "prompt", "logprobs", "echo", "suffix", "best_of"]


def _mutated(base: dict[str, Any], fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    changes = st.dictionaries(st.sampled_from(fields), field_values, max_size=4)
    dropped = st.sets(st.sampled_from(sorted(base)), max_size=1)
    return st.builds(
        lambda c, d: {k: v for k, v in {**base, **c}.items() if k not in d}, changes, dropped
    )


def requests(model: str) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(path, body) pairs: valid requests with some fields replaced, added or dropped."""
    chat_base = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    chat = st.builds(
        lambda body, messages: {**body, "messages": messages} if messages else body,
        _mutated(chat_base, CHAT_FIELDS),
        st.none() | st.lists(message, max_size=3),
    )
    completion_base = {"model": model, "prompt": "hello", "max_tokens": 4}
    completion = _mutated(completion_base, COMPLETION_FIELDS)
    return st.tuples(st.just(CHAT_PATH), chat) | st.tuples(st.just(COMPLETIONS_PATH), completion)


def encode(body: Any) -> bytes:
    """JSON as a client would send it; NaN and Infinity as Python's json writes them."""
    return json.dumps(body, allow_nan=True).encode()


def raw_bodies() -> st.SearchStrategy[bytes]:
    nested = st.integers(min_value=1, max_value=5000).map(lambda d: b"[" * d + b"]" * d)
    return st.binary(max_size=64) | json_values.map(encode) | nested


def check_answer(status: int, content_type: str, text: str) -> None:
    """What every answer must be: never a 5xx; errors in OpenAI's envelope; streams that end
    with [DONE] or an error event; JSON bodies that parse."""
    assert status < 500, (status, text[:500])
    if status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        return
    if content_type.startswith("text/event-stream"):
        events, done = parse_sse(text)
        assert done or "error" in events[-1], text[-500:]
        return
    body = json.loads(text)
    assert body["choices"] and all(math.isfinite(body["usage"][k]) for k in ("total_tokens",))
