"""The OpenAI API over an in-process simulated engine: shapes, usage, streaming and errors."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.config import RequestLimits, RouterConfig
from deployments.engines.base import EngineOutput, EngineRequest
from deployments.engines.profiles import ZERO_LATENCY
from deployments.tokenizer import PromptTokenizer
from tests.support import (
    API_MAX_MODEL_LEN,
    API_MODEL,
    CHAT,
    CMPL,
    EngineBackend,
    asgi_post_scope,
    assert_error,
    chat,
    cmpl,
    parse_sse,
    simulated_api,
    simulated_app,
)

MODEL = API_MODEL
MAX_MODEL_LEN = API_MAX_MODEL_LEN


@pytest.fixture
async def client(embedded_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with simulated_api(embedded_model, RouterConfig(max_body_bytes=64 * 1024)) as (http, _):
        yield http


async def test_models(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    assert (await client.get("/v1/models/nope")).status_code == 404


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": [MODEL]}


async def test_completion_usage_and_length(client: httpx.AsyncClient, embedded_model: Path) -> None:
    prompt = "The quick brown fox jumps over the lazy dog"
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 7}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    expected_prompt = len(PromptTokenizer(str(embedded_model)).encode_text(prompt))
    assert body["usage"] == {
        "prompt_tokens": expected_prompt,
        "completion_tokens": 7,
        "total_tokens": expected_prompt + 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert body["choices"][0]["finish_reason"] == "length"


async def test_token_id_prompt_and_n(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 3, "n": 2}
    )
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 6


async def test_completion_logprobs(client: httpx.AsyncClient) -> None:
    body = (
        await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "logprobs": 2},
        )
    ).json()
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 4
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0


async def test_streamed_logprobs_offsets_match_the_full_response(
    client: httpx.AsyncClient,
) -> None:
    """text_offset is where each token starts in the whole text, streamed or not, also after a
    token that ends inside a UTF-8 character (its text arrives with the next chunk)."""
    request = cmpl("Once upon a time", max_tokens=30, seed=7, temperature=0, logprobs=1)
    full = (await client.post(CMPL, json=request)).json()["choices"][0]
    response = await client.post(CMPL, json={**request, "stream": True})
    events, done = parse_sse(response.text)
    assert done
    chunks = [e["choices"][0] for e in events]
    # This seed's text has such a token: a chunk with no text of its own.
    assert any(c["text"] == "" and c["logprobs"]["tokens"] for c in chunks)
    assert "".join(c["text"] for c in chunks) == full["text"]
    streamed = [offset for c in chunks for offset in c["logprobs"]["text_offset"]]
    assert streamed == full["logprobs"]["text_offset"]


async def test_repeated_prefix_reports_cached_tokens(client: httpx.AsyncClient) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(80))
    first = (await client.post("/v1/chat/completions", json=chat(long_prompt, max_tokens=2))).json()
    second = (
        await client.post("/v1/chat/completions", json=chat(long_prompt, max_tokens=2))
    ).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["usage"]["prompt_tokens"]
    assert cached % ZERO_LATENCY.block_size == 0


async def test_chat_stream_with_usage(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json=chat(max_tokens=5, stream=True, stream_options={"include_usage": True}),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events, done = parse_sse(response.text)
    assert done
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    content_chunks = [e for e in events if e["choices"]]
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "length"
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


class OneBatchBackend(EngineBackend):
    """Every output of a request in one batch, as a replica whose stream interval outlasts the
    request sends them."""

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        yield [output async for batch in super().generate(request) for output in batch]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_batch_of_outputs_streams_as_one_event_per_output(
    embedded_model: Path, path: str
) -> None:
    """A batch goes out as one HTTP write, yet the client parses the same events as when every
    output came alone."""
    body: dict[str, Any] = {"max_tokens": 5, "n": 2, "stream": True}
    body |= chat() if path.endswith("chat/completions") else {"model": MODEL, "prompt": "a b c"}
    streams = []
    for backend in (EngineBackend, OneBatchBackend):
        async with simulated_api(embedded_model, RouterConfig(), backend) as (http, _):
            events, done = parse_sse((await http.post(path, json=body)).text)
        assert done
        # The texts are random; each event's choices and finish reasons are the stream's shape.
        streams.append(
            [[(c["index"], c["finish_reason"]) for c in event["choices"]] for event in events]
        )
    per_output, one_batch = streams
    assert sum(map(len, per_output)) >= 10  # an event per token and choice (chat: + the role's)
    assert one_batch == per_output


async def test_completion_stream_with_usage(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "a b c",
            "max_tokens": 4,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events, done = parse_sse(response.text)
    assert done
    assert all(e["object"] == "text_completion" for e in events)
    assert all(e["usage"] is None for e in events[:-1])
    usage = events[-1]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 8  # both choices
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 8


async def test_completion_stream_without_usage(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 4, "stream": True}
    )
    events, done = parse_sse(response.text)
    assert done
    assert all(e["usage"] is None for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def user(content: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


# Every bad input of issue 7 that has a JSON body, with the status and `param` it must get.
BAD_REQUESTS = [
    # missing or wrongly typed fields
    (CHAT, {"messages": [{"role": "user", "content": "a"}]}, 400, "model"),
    (CHAT, {"model": MODEL}, 400, "messages"),
    (CMPL, {"model": MODEL}, 400, "prompt"),
    (CHAT, {**chat(), "model": 5}, 400, "model"),
    (CHAT, chat(max_tokens="ten"), 400, "max_tokens"),
    (CHAT, chat(max_tokens=2.5), 400, "max_tokens"),
    (CHAT, chat(stream="yes"), 400, "stream"),
    (CHAT, chat(user=5), 400, "user"),
    (CHAT, chat(logprobs=5), 400, "logprobs"),
    # JSON's true, "7" and 7.0 are not the integer 7 (nor true the number 1), as for OpenAI
    (CHAT, chat(n=True), 400, "n"),
    (CHAT, chat(seed=True), 400, "seed"),
    (CHAT, chat(temperature=True), 400, "temperature"),
    (CHAT, chat(temperature="0.7"), 400, "temperature"),
    (CHAT, chat(max_tokens="7"), 400, "max_tokens"),
    (CHAT, chat(max_completion_tokens=7.0), 400, "max_completion_tokens"),
    (CHAT, chat(logprobs=True, top_logprobs=True), 400, "top_logprobs"),
    (CHAT, chat(top_k=True), 400, "top_k"),
    (CMPL, cmpl(logprobs=True), 400, "logprobs"),
    (CMPL, cmpl(best_of=True), 400, "best_of"),
    # sampling ranges
    (CHAT, chat(temperature=3), 400, "temperature"),
    (CHAT, chat(temperature=-0.1), 400, "temperature"),
    (CHAT, chat(top_p=0), 400, "top_p"),
    (CHAT, chat(top_p=1.5), 400, "top_p"),
    (CHAT, chat(top_k=-2), 400, "top_k"),
    (CHAT, chat(presence_penalty=2.5), 400, "presence_penalty"),
    (CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    (CHAT, chat(seed=2**64), 400, "seed"),
    # max_tokens
    (CHAT, chat(max_tokens=0), 400, "max_tokens"),
    (CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    (CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    (CMPL, cmpl(max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    (CMPL, cmpl(max_tokens=10**30), 400, "max_tokens"),
    # n, stop, logprobs
    (CHAT, chat(n=0), 400, "n"),
    (CHAT, chat(n=17), 400, "n"),
    (CHAT, chat(stop=[""]), 400, "stop"),
    (CHAT, chat(stop=[str(i) for i in range(17)]), 400, "stop"),
    (CHAT, chat(stop="x" * 1025), 400, "stop"),
    (CHAT, chat(stop=[1, 2]), 400, "stop.0"),
    (CHAT, chat(stop_token_ids=[-1]), 400, "stop_token_ids.0"),
    (CHAT, chat(stop_token_ids=[10**9]), 400, "stop_token_ids"),
    (CHAT, chat(stop_token_ids=list(range(17))), 400, "stop_token_ids"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (CMPL, cmpl(logprobs=21), 400, "logprobs"),
    (CMPL, cmpl(logprobs=-1), 400, "logprobs"),
    # streams and unsupported features
    (CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    (
        CHAT,
        chat(stream=True, stream_options={"include_usage": "y"}),
        400,
        "stream_options.include_usage",
    ),
    (
        CHAT,
        chat(stream=True, stream_options={"continuous_usage_stats": True}),
        400,
        "stream_options.continuous_usage_stats",
    ),
    (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format"),
    (CHAT, chat(response_format={"type": "yaml"}), 400, "response_format.type"),
    (CHAT, chat(tools=[{"type": "function"}]), 400, "tools"),
    (CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    (CHAT, chat(tool_choice="auto"), 400, "tool_choice"),
    (CHAT, chat(tool_choice={"type": "function", "function": {"name": "f"}}), 400, "tool_choice"),
    (CHAT, chat(parallel_tool_calls=False), 400, "parallel_tool_calls"),
    (CHAT, chat(functions=[{"name": "f", "parameters": {}}]), 400, "functions"),
    (CHAT, chat(function_call={"name": "f"}), 400, "function_call"),
    (CHAT, chat(function_call="auto"), 400, "function_call"),
    (
        CHAT,
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]},
            ],
        },
        400,
        "messages.1.tool_calls",
    ),
    (CHAT, chat(logit_bias={"1": 5}), 400, "logit_bias"),
    (CMPL, cmpl(echo=True), 400, "echo"),
    (CMPL, cmpl(suffix="end"), 400, "suffix"),
    (CMPL, cmpl(best_of=3), 400, "best_of"),
    # malformed messages
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    (CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": MODEL, "messages": [{"role": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"model": MODEL, "messages": [{"content": "a"}]}, 400, "messages.0.role"),
    (CHAT, {"model": MODEL, "messages": ["hi"]}, 400, "messages.0"),
    (CHAT, user(5), 400, "messages.0.content"),
    (CHAT, user([{"type": "image_url", "image_url": {"url": "x"}}]), 400, "messages.0.content"),
    # prompts and token ids
    (CMPL, cmpl(""), 400, "prompt"),
    (CMPL, cmpl([]), 400, "prompt"),
    (CMPL, cmpl([[1], [2]]), 400, "prompt"),
    (CMPL, cmpl([10**9]), 400, "prompt"),
    (CMPL, cmpl([-1]), 400, "prompt.0"),
    (CMPL, cmpl([True, False]), 400, "prompt.0"),
    (CMPL, cmpl([1.5]), 400, "prompt.0"),
    # unknown model
    (CHAT, {**chat(), "model": "gpt-9"}, 404, "model"),
    (CMPL, cmpl(model="../../etc/passwd"), 404, "model"),
]


@pytest.mark.parametrize(("path", "payload", "status", "param"), BAD_REQUESTS)
async def test_bad_requests_get_4xx_in_openai_shape(
    client: httpx.AsyncClient, path: str, payload: dict[str, Any], status: int, param: str
) -> None:
    response = await client.post(path, json=payload)
    assert_error(response, status, param)
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_stream_options_are_ignored_as_openai_and_vllm_do(
    client: httpx.AsyncClient,
) -> None:
    """The openai SDK sends OpenAI's include_obfuscation; it was a 400 ("Extra inputs are not
    permitted"), as was any option a newer client adds."""
    options = {"include_usage": True, "include_obfuscation": False, "newer_option": 1}
    response = await client.post(CHAT, json=chat(max_tokens=2, stream=True, stream_options=options))
    assert response.status_code == 200, response.text
    assert '"usage"' in response.text


async def test_a_bad_token_id_is_named_not_the_text_prompt_it_is_not(
    client: httpx.AsyncClient,
) -> None:
    """The prompt is a union (text, token ids, texts): its first error was the text member's,
    "Input should be a valid string", for token ids with a negative one; the member whose shape
    the value has is named instead."""
    response = await client.post(CMPL, json=cmpl([5, -1]))
    assert_error(response, 400, "prompt.1")
    assert "prompt.1: Input should be greater than or equal to 0" in response.text
    for prompt, said in [
        (["hello", "world", 7], "prompt.2: Input should be a valid string"),  # texts, one not
        ([-1, -2], "prompt.0: Input should be greater than or equal to 0"),  # two bad ids
        ([[1, -2, -3]], "prompt.0.1: Input should be greater than or equal to 0"),
    ]:
        assert said in (await client.post(CMPL, json=cmpl(prompt))).text, prompt
    assert (
        "stop.1: Input should be a valid string"
        in (await client.post(CHAT, json=chat(stop=["a", 1, 2]))).text
    )
    response = await client.post(CMPL, json=cmpl([[1], [2]]))
    assert "prompt: exactly one prompt per request is supported" in response.text


async def test_a_content_part_of_another_type_is_named_in_the_error(
    client: httpx.AsyncClient,
) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    response = await client.post(CHAT, json=user([{"type": "text", "text": "what?"}, image]))
    assert_error(response, 400, "messages.0.content")
    assert "content parts of type 'image_url' are not supported" in response.text


async def test_fields_that_ask_for_no_tool_use_are_accepted(client: httpx.AsyncClient) -> None:
    """Clients send null, [] or "none" for the tool fields they do not use (OpenAI and vLLM
    take tool_choice "none" without tools): those mean no tool calls, which is what we do."""
    no_tools = chat(
        max_tokens=1,
        tools=[],
        tool_choice="none",
        parallel_tool_calls=None,
        functions=None,
        function_call="none",
    )
    no_tools["messages"] += [
        {"role": "assistant", "content": "b", "tool_calls": []},
        {"role": "user", "content": "c", "tool_calls": None},
    ]
    response = await client.post(CHAT, json=no_tools)
    assert response.status_code == 200, response.text


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**chat(), "model": "gpt-9"})
    assert "gpt-9" in assert_error(response, 404, "model")
    assert response.json()["error"]["code"] == "model_not_found"


async def test_context_length_names_both_numbers(client: httpx.AsyncClient) -> None:
    long_prompt = " ".join(f"w{i}" for i in range(400))
    message = assert_error(
        await client.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt}),
        400,
        "prompt",
    )
    assert str(MAX_MODEL_LEN) in message and "tokens" in message
    # The field named is the one the client set (max_completion_tokens wins over max_tokens).
    for limits, param in [
        ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
        ({"max_completion_tokens": MAX_MODEL_LEN}, "max_completion_tokens"),
        ({"max_completion_tokens": MAX_MODEL_LEN, "max_tokens": 1}, "max_completion_tokens"),
    ]:
        message = assert_error(
            await client.post("/v1/chat/completions", json=chat("hi", **limits)), 400, param
        )
        assert str(MAX_MODEL_LEN) in message and f"{param} is {MAX_MODEL_LEN}" in message
        assert f"Lower {param} to" in message


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", None),
        (b"\xff\xfe", None),  # not UTF-8
        (b'{"model": "\xc3\x28"}', None),  # invalid UTF-8 inside a string
        (b"[1, 2]", None),
        (b'"text"', None),
        (b"null", None),
        (b"", None),
        (b'{"model": "tiny", "x": ' + b"[" * 33 + b"]" * 33 + b"}", "nesting_too_deep"),
        # Deep enough to exhaust the recursion of Python's JSON parser itself.
        (b"[" * 20_000 + b"]" * 20_000, "nesting_too_deep"),
        # Valid JSON that no tokenizer can encode (was a 500: the tokenizer raised).
        (json.dumps(chat("\ud800 lone")).encode(), None),
        (json.dumps(cmpl("a\udfff")).encode(), None),
    ],
)
async def test_unparseable_bodies(
    client: httpx.AsyncClient, content: bytes, code: str | None
) -> None:
    response = await client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 400)
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_wrong_content_type_is_415(client: httpx.AsyncClient, content_type: str) -> None:
    response = await client.post(
        "/v1/chat/completions", content=json.dumps(chat()), headers={"content-type": content_type}
    )
    assert_error(response, 415)


async def test_json_content_types_are_accepted(client: httpx.AsyncClient) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = await client.post(
            "/v1/chat/completions",
            content=json.dumps(chat(max_tokens=1)),
            headers={"content-type": content_type},
        )
        assert response.status_code == 200, response.text


async def test_wrong_method_is_405_in_openai_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/chat/completions"), 405)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_sampling_values_are_refused(
    client: httpx.AsyncClient, literal: str
) -> None:
    for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        body = json.dumps(chat())[:-1] + f', "{field}": {literal}}}'
        assert_error(await client.post("/v1/chat/completions", content=body), 400, field)


async def test_limits_are_configurable(embedded_model: Path) -> None:
    limits = RequestLimits(
        max_json_depth=4, max_n=2, max_logprobs=1, max_stop_sequences=1, max_stop_chars=3,
        max_messages=1,
    )  # fmt: skip
    async with simulated_api(embedded_model, RouterConfig(limits=limits)) as (http, _):
        for payload, param in [
            (chat(n=3), "n"),
            (chat(logprobs=True, top_logprobs=2), "top_logprobs"),
            (chat(stop=["a", "b"]), "stop"),
            (chat(stop="abcd"), "stop"),
            (chat(stop_token_ids=[1, 2]), "stop_token_ids"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "a"}] * 2}, "messages"),
        ]:
            assert_error(await http.post("/v1/chat/completions", json=payload), 400, param)
        deep = chat(metadata={"a": {"b": {"c": {}}}})
        assert_error(await http.post("/v1/chat/completions", json=deep), 400)
        ok = chat(n=2, stop="abc", max_tokens=1, metadata={"a": {"b": 1}})
        assert (await http.post("/v1/chat/completions", json=ok)).status_code == 200


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("x" * 70_000))
    assert_error(response, 413)


async def test_unknown_route_is_404_in_openai_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v2/whatever"), 404)


async def test_client_gone_mid_upload_is_499_not_an_error(
    embedded_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up halfway through its body is nobody's failure: no ERROR log and no
    5xx in the metrics, but nginx's 499 (client closed request) in the access log."""
    received: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"model": "tiny", "mess', "more_body": True},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return received.pop(0) if received else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with simulated_app(embedded_model, RouterConfig()) as (_, _, api):
        with caplog.at_level(logging.WARNING):
            await api.app(asgi_post_scope(CHAT), receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert json.loads(sent[1]["body"])["error"]["code"] == "client_closed_request"
    assert not caplog.records


async def test_a_stalled_upload_gets_a_408_within_the_request_deadline(
    embedded_model: Path,
) -> None:
    """A client that sends part of its body and stalls: a 408 once request_timeout_s has
    passed (it waited for the body forever, holding one of the router's slots)."""
    received: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"model": "tiny", "mess', "more_body": True},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if received:
            return received.pop(0)
        await asyncio.sleep(3600)  # the rest of the body never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with simulated_app(embedded_model, RouterConfig(request_timeout_s=0.2)) as (_, _, api):
        await asyncio.wait_for(api.app(asgi_post_scope(CHAT), receive, send), timeout=30)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "request_body_timeout" and "within 0.2 s" in error["message"]
