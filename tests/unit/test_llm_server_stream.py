"""LLMServer.generate's stream batching (deployments/llm_server.py), on a scripted engine without
Ray: the first output goes out alone and at once, later ones wait for the interval in one batch,
and the end of the stream (or an engine error) never waits for it."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator

import pytest

from deployments.engines.base import EngineOutput, EngineRequest, SamplingParams
from deployments.llm_server import LLMServer

REQUEST = EngineRequest(
    request_id="r1", prompt_token_ids=(1, 2), sampling=SamplingParams(max_tokens=8)
)
# Long enough that a test waiting on it would time out: whatever arrives within the test's
# deadline arrived without waiting for the interval.
FOREVER_MS = 600_000.0
DEADLINE_S = 5.0


def output(token: int, finish: bool = False) -> EngineOutput:
    return EngineOutput(
        request_id="r1", token_ids=(token,), finish_reason="length" if finish else None
    )


class ScriptedEngine:
    """An engine whose outputs the test feeds one at a time (None ends the stream)."""

    def __init__(self) -> None:
        self.feed: asyncio.Queue[EngineOutput | Exception | None] = asyncio.Queue()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        while (item := await self.feed.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item


class StreamOnlyServer(LLMServer):
    """An LLMServer's streaming state around a scripted engine, without Ray or a real engine."""

    def __init__(self, engine: ScriptedEngine, stream_interval_ms: float) -> None:
        self._model = types.SimpleNamespace(stream_interval_ms=stream_interval_ms)
        self._engine = engine
        self._telemetry = types.SimpleNamespace(generate=lambda request, stream: stream)
        self._replica_id = "replica-a"
        self._arrived = self._finished = 0

    def __del__(self) -> None:
        """No engine to shut down."""


def tokens(batch: list[EngineOutput]) -> list[int]:
    return [token for output in batch for token in output.token_ids]


async def next_batch(stream: AsyncIterator[list[EngineOutput]]) -> list[int]:
    return tokens(await asyncio.wait_for(anext(stream), DEADLINE_S))


async def test_the_first_output_goes_alone_and_the_rest_waits_for_the_interval() -> None:
    engine = ScriptedEngine()
    replica = StreamOnlyServer(engine, FOREVER_MS)
    stream = replica.generate(REQUEST)
    engine.feed.put_nowait(output(1))
    assert await next_batch(stream) == [1]  # time to first token: never held

    pending = asyncio.ensure_future(anext(stream))
    for token in (2, 3, 4):
        engine.feed.put_nowait(output(token))
        await asyncio.sleep(0.01)
    assert not pending.done()  # the interval is not up: the batch keeps filling
    # The last output ends the stream: the batch goes out without waiting for the interval.
    engine.feed.put_nowait(output(5, finish=True))
    engine.feed.put_nowait(None)
    assert tokens(await asyncio.wait_for(pending, DEADLINE_S)) == [2, 3, 4, 5]
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), DEADLINE_S)
    assert (replica._arrived, replica._finished) == (1, 1)


async def test_a_batch_goes_out_when_the_interval_is_up() -> None:
    engine = ScriptedEngine()
    stream = StreamOnlyServer(engine, 20.0).generate(REQUEST)
    engine.feed.put_nowait(output(1))
    assert await next_batch(stream) == [1]
    engine.feed.put_nowait(output(2))
    # The stream goes on (no end in the feed): only the interval can release this batch.
    assert await next_batch(stream) == [2]
    engine.feed.put_nowait(output(3, finish=True))
    engine.feed.put_nowait(None)
    assert await next_batch(stream) == [3]


async def test_an_engine_error_releases_the_batch_then_raises() -> None:
    engine = ScriptedEngine()
    stream = StreamOnlyServer(engine, FOREVER_MS).generate(REQUEST)
    engine.feed.put_nowait(output(1))
    assert await next_batch(stream) == [1]
    engine.feed.put_nowait(output(2))
    engine.feed.put_nowait(RuntimeError("engine step failed"))
    assert await next_batch(stream) == [2]  # what the client was owed, at once
    with pytest.raises(RuntimeError, match="engine step failed"):
        await asyncio.wait_for(anext(stream), DEADLINE_S)


async def test_interval_zero_sends_each_output_as_it_comes() -> None:
    engine = ScriptedEngine()
    stream = StreamOnlyServer(engine, 0.0).generate(REQUEST)
    for token in (1, 2, 3):
        engine.feed.put_nowait(output(token))
        assert await next_batch(stream) == [token]
    engine.feed.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), DEADLINE_S)


async def test_the_throughput_the_autoscaler_reads_counts_choices() -> None:
    """The engines count a request with n choices as n sequences (running, waiting): the
    finished and accepted counts must too, or a backlog of them is divided by a rate n times
    too small."""
    engine = ScriptedEngine()
    server = StreamOnlyServer(engine, stream_interval_ms=0)
    request = REQUEST.model_copy(update={"sampling": SamplingParams(max_tokens=8, n=3)})
    stream = server.generate(request)
    engine.feed.put_nowait(output(7, finish=True))
    engine.feed.put_nowait(None)
    assert [tokens(batch) async for batch in stream] == [[7]]
    assert (server._arrived, server._finished) == (3, 3)
