"""The API as OpenAI's and vLLM's OpenAI server answer: nullable fields, chat rendering, the
request fields we honour or refuse, and tools with tool_choice "none"."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from deployments.api.chat import conversation, supports_developer_role
from deployments.api.protocol import ChatMessage
from deployments.config import RouterConfig
from deployments.engines.base import EngineOutput, EngineRequest, SamplingParams
from deployments.engines.profiles import ZERO_LATENCY
from deployments.engines.simulated import SimulatedEngineCore
from deployments.tokenizer import PromptTokenizer
from tests.support import (
    CHAT,
    CMPL,
    EngineBackend,
    assert_error,
    chat,
    cmpl,
    parse_sse,
    simulated_api,
)


class RecordingBackend(EngineBackend):
    """Keeps every engine request, to check what reached the engine."""

    requests: ClassVar[list[EngineRequest]] = []

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        self.requests.append(request)
        async for batch in super().generate(request):
            yield batch


@pytest.fixture
async def client(embedded_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    RecordingBackend.requests = []
    async with simulated_api(embedded_model, RouterConfig(), RecordingBackend) as (http, _):
        yield http


def last_request() -> EngineRequest:
    return RecordingBackend.requests[-1]


async def ok(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    response = await http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response


# ---- null means the default -------------------------------------------------------------------


async def test_null_for_nullable_fields_means_their_default(client: httpx.AsyncClient) -> None:
    body = (await ok(client, CHAT, chat(max_tokens=2, n=None, stream=None, logprobs=None))).json()
    assert len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None
    body = (await ok(client, CMPL, cmpl(max_tokens=2, n=None, stream=None, echo=None))).json()
    assert len(body["choices"]) == 1
    options = {"stream": True, "stream_options": {"include_usage": None}}
    for path, request in [
        (CHAT, chat(max_tokens=2, **options)),
        (CMPL, cmpl(max_tokens=2, **options)),
    ]:
        events, done = parse_sse((await ok(client, path, request)).text)
        assert done and all(e["usage"] is None for e in events)  # no usage chunk: the default


@pytest.mark.parametrize(
    ("field", "value"), [("n", True), ("stream", 0), ("logprobs", "false"), ("n", 1.0)]
)
async def test_other_values_stay_strict(client: httpx.AsyncClient, field: str, value: Any) -> None:
    assert_error(await client.post(CHAT, json=chat(max_tokens=2, **{field: value})), 400, field)


# ---- chat rendering as vLLM's -----------------------------------------------------------------


async def test_text_parts_are_joined_with_newlines(
    client: httpx.AsyncClient, embedded_model: Path
) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    await ok(client, CHAT, chat(max_tokens=2, messages=[{"role": "user", "content": parts}]))
    expected = PromptTokenizer(str(embedded_model)).encode_chat(
        [{"role": "user", "content": "Hello\nworld"}]
    )
    assert list(last_request().prompt_token_ids) == expected


async def test_developer_messages_are_system_ones_for_a_template_without_the_role(
    client: httpx.AsyncClient, embedded_model: Path
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": "Answer in French."},
    ]
    await ok(client, CHAT, chat(max_tokens=2, messages=messages))
    expected = PromptTokenizer(str(embedded_model)).encode_chat(
        [
            {"role": "system", "content": "Be brief.\n\nAnswer in French."},
            {"role": "user", "content": "hi"},
        ]
    )
    assert list(last_request().prompt_token_ids) == expected


async def test_names_reach_the_chat_template(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[Sequence[dict[str, str]]] = []
    encode_chat = PromptTokenizer.encode_chat

    def recording(self: PromptTokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
        rendered.append(messages)
        return encode_chat(self, messages)

    monkeypatch.setattr(PromptTokenizer, "encode_chat", recording)
    await ok(
        client,
        CHAT,
        chat(max_tokens=2, messages=[{"role": "user", "content": "hi", "name": "ann"}]),
    )
    assert rendered == [[{"role": "user", "content": "hi", "name": "ann"}]]


def messages(*items: dict[str, Any]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in items]


DEVELOPER_CHATS = [
    [{"role": "developer", "content": "D"}, {"role": "user", "content": "u"}],
    [{"role": "system", "content": "S"}, {"role": "developer", "content": "D", "name": "x"}],
    [{"role": "user", "content": "u"}, {"role": "developer", "content": ""}],
    [{"role": "developer", "content": None}, {"role": "system", "content": "S"}],
]


@pytest.mark.parametrize("chat_messages", DEVELOPER_CHATS)
def test_developer_conversion_is_vllms(chat_messages: list[dict[str, Any]]) -> None:
    hf = pytest.importorskip("vllm.renderers.hf")
    parsed = conversation(messages(*chat_messages), developer_role=True)
    vllm = hf._consolidate_system_messages(hf._convert_developer_to_system(parsed))
    assert conversation(messages(*chat_messages), developer_role=False) == vllm


def test_a_template_that_names_the_developer_role_gets_it() -> None:
    template = "{% if message['role'] == 'developer' %}...{% endif %}"
    assert supports_developer_role(template)
    assert supports_developer_role({"default": template, "tool_use": ""})
    assert not supports_developer_role("{{ message['role'] }}")
    assert not supports_developer_role(None)
    dev = messages({"role": "developer", "content": "D"})
    assert conversation(dev, developer_role=True) == [{"role": "developer", "content": "D"}]


# ---- known fields: honoured or refused, never dropped -----------------------------------------

UNSUPPORTED = [
    (CHAT, "modalities", ["text", "audio"]),
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    (CHAT, "prediction", {"type": "content", "content": "x"}),
    (CHAT, "reasoning_effort", "high"),
    (CHAT, "continue_final_message", True),
    (CHAT, "chat_template", "{{ messages }}"),
    (CHAT, "echo", True),
    (CHAT, "structured_outputs", {"json": {"type": "object"}}),
    (CMPL, "structured_outputs", {"regex": "a+"}),
    (CHAT, "guided_json", {"type": "object"}),
    (CHAT, "guided_regex", "a+"),
    (CMPL, "guided_choice", ["a", "b"]),
    (CMPL, "guided_grammar", "root ::= 'a'"),
    (CMPL, "response_format", {"type": "json_object"}),
    (CHAT, "use_beam_search", True),
    (CHAT, "use_beam_search", 1),  # JSON's 1 is not false, nor is 0
    (CHAT, "bad_words", ["the"]),
    (CMPL, "skip_special_tokens", False),
    (CMPL, "prompt_embeds", "AAAA"),
    (CMPL, "add_special_tokens", False),
]


@pytest.mark.parametrize(("path", "field", "value"), UNSUPPORTED)
async def test_known_unsupported_fields_are_refused(
    client: httpx.AsyncClient, path: str, field: str, value: Any
) -> None:
    body = chat(max_tokens=2) if path == CHAT else cmpl(max_tokens=2)
    message = assert_error(await client.post(path, json={**body, field: value}), 400, field)
    assert field in message


async def test_values_that_ask_for_nothing_and_unknown_fields_pass(
    client: httpx.AsyncClient,
) -> None:
    await ok(
        client,
        CHAT,
        chat(
            max_tokens=2,
            modalities=["text"],
            audio=None,
            use_beam_search=False,
            skip_special_tokens=True,
            length_penalty=1,
            priority=0,
            add_generation_prompt=True,
            metadata={"team": "a"},
            some_future_field={"x": 1},
        ),
    )


async def test_vllm_sampling_extensions_reach_the_engine(client: httpx.AsyncClient) -> None:
    extensions = {
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "min_tokens": 2,
        "include_stop_str_in_output": True,
        "allowed_token_ids": [5, 6, 7],
    }
    for path, body in [
        (CHAT, chat(max_tokens=2, **extensions)),
        (CMPL, cmpl(max_tokens=2, **extensions)),
    ]:
        await ok(client, path, body)
        sampling = last_request().sampling
        assert sampling.min_p == 0.05 and sampling.repetition_penalty == 1.2
        assert sampling.min_tokens == 2 and sampling.include_stop_str_in_output
        assert sampling.allowed_token_ids == (5, 6, 7)
    await ok(client, CHAT, chat(max_tokens=2))
    assert last_request().sampling.repetition_penalty == 1.0  # vLLM's default, not 0
    # seed -1 is vLLM's "no seed": both engines get None (the simulated one took it as a seed).
    await ok(client, CHAT, chat(max_tokens=2, seed=-1, temperature=0, n=1))
    assert last_request().sampling.seed is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 3}, "min_tokens"),  # more than max_tokens (2)
        ({"min_tokens": True}, "min_tokens"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
        # Greedy choices are all the same: vLLM refuses n > 1, which was a 500 on it only.
        ({"temperature": 0, "n": 2}, "n"),
    ],
)
async def test_vllm_sampling_extensions_get_vllms_ranges(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    assert_error(await client.post(CHAT, json=chat(max_tokens=2, **extra)), 400, param)


async def test_min_tokens_is_checked_against_the_context_left(client: httpx.AsyncClient) -> None:
    """Without max_tokens a chat may fill the context; min_tokens may not ask for more."""
    body = chat(max_tokens=2, min_tokens=10_000)
    del body["max_tokens"]
    assert "max_tokens" in assert_error(await client.post(CHAT, json=body), 400, "min_tokens")


def test_vllm_gets_the_sampling_extensions() -> None:
    pytest.importorskip("vllm")
    from deployments.engines.vllm import _vllm_sampling_params

    params = _vllm_sampling_params(
        SamplingParams(
            max_tokens=8,
            min_p=0.1,
            repetition_penalty=1.3,
            min_tokens=4,
            include_stop_str_in_output=True,
            allowed_token_ids=(3, 4),
        )
    )
    assert (params.min_p, params.repetition_penalty, params.min_tokens) == (0.1, 1.3, 4)
    assert params.include_stop_str_in_output and params.allowed_token_ids == [3, 4]


# ---- the simulated engine's stops, as vLLM's ---------------------------------------------------


def run_choice(core: SimulatedEngineCore, **sampling: Any) -> list[EngineOutput]:
    core.add_request(
        EngineRequest(
            request_id="r",
            prompt_token_ids=(1, 2, 3),
            sampling=SamplingParams.model_validate({"seed": 3, **sampling}),
        )
    )
    outputs: list[EngineOutput] = []
    while core.has_work():
        outputs += core.step().outputs
    return outputs


def test_no_stop_token_before_min_tokens() -> None:
    # 7 of the 8 tokens end the choice: without min_tokens it ends at once.
    stops = tuple(range(7))
    core = SimulatedEngineCore(ZERO_LATENCY, vocab_size=8)
    assert len(run_choice(core, max_tokens=20, stop_token_ids=stops)) < 5
    outputs = run_choice(core, max_tokens=20, stop_token_ids=stops, min_tokens=5)
    assert [o.token_ids for o in outputs[:5]] == [(7,)] * 5
    assert len(outputs) > 5 and outputs[-1].finish_reason == "stop"


def test_a_stop_token_keeps_its_text_with_include_stop_str_in_output() -> None:
    def detokenize(ids: Sequence[int]) -> str:
        return "".join(f"<{i}>" for i in ids)

    core = SimulatedEngineCore(ZERO_LATENCY, vocab_size=2, detokenize=detokenize)
    for include in (False, True):
        outputs = run_choice(
            core, max_tokens=20, stop_token_ids=(0,), include_stop_str_in_output=include
        )
        text = "".join(o.text for o in outputs)
        assert outputs[-1].finish_reason == "stop"
        assert text.endswith("<0>") == include


async def test_stop_strings_count_after_min_tokens_and_may_stay_in_the_text(
    client: httpx.AsyncClient,
) -> None:
    body = cmpl("Once upon a time", max_tokens=40, seed=11, stop=["e"])
    plain = (await ok(client, CMPL, body)).json()
    first = plain["choices"][0]
    assert first["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 10
    kept = (await ok(client, CMPL, {**body, "include_stop_str_in_output": True})).json()
    assert kept["choices"][0]["text"] == first["text"] + "e"
    # The same tokens (same seed), but the "e" that ended the first choice is within the first
    # min_tokens tokens now: it does not count.
    longer = (await ok(client, CMPL, {**body, "min_tokens": 10})).json()
    assert longer["usage"]["completion_tokens"] >= 10
    assert longer["choices"][0]["text"].startswith(first["text"] + "e")


# ---- tools with tool_choice "none" ------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


async def test_tools_with_tool_choice_none_get_a_text_answer(client: httpx.AsyncClient) -> None:
    plain = (await ok(client, CHAT, chat(max_tokens=2))).json()
    answer = (await ok(client, CHAT, chat(max_tokens=2, tools=TOOLS, tool_choice="none"))).json()
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    # The tools are not rendered into the prompt.
    assert answer["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS}, "tools"),  # tool_choice defaults to "auto"
        ({"tools": TOOLS, "tool_choice": None}, "tools"),
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ],
)
async def test_tools_with_any_other_tool_choice_are_refused(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    assert_error(await client.post(CHAT, json=chat(max_tokens=2, **extra)), 400, param)
