"""ServeBackend (deployments/router.py) over a stand-in for Serve's streaming response, no cluster:
which handle errors become which API errors, and that the request is cancelled when abandoned."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from deployments.api.openai_app import OverloadedError, UnavailableError
from deployments.engines.base import EngineOutput, EngineRequest, SamplingParams
from deployments.router import ServeBackend

REQUEST = EngineRequest(
    request_id="r1", prompt_token_ids=(1, 2), sampling=SamplingParams(max_tokens=2)
)


class FakeResponses:
    """What handle.options(stream=True).generate.remote() returns, failing as told.

    Like Ray 2.60's DeploymentResponseGenerator, cancel() of a request that failed to be
    assigned re-raises that failure (it fetches the assignment's result).
    """

    def __init__(self, outputs: list[list[EngineOutput]], error: Exception | None) -> None:
        self._outputs = iter(outputs)
        self._error = error
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[list[EngineOutput]]:
        return self

    async def __anext__(self) -> list[EngineOutput]:
        batch = next(self._outputs, None)
        if batch is not None:
            return batch
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True
        if self._error is not None:
            raise self._error


class FakeHandle:
    def __init__(self, responses: FakeResponses) -> None:
        self.responses = responses

    def options(self, **_: Any) -> FakeHandle:
        return self

    @property
    def generate(self) -> FakeHandle:
        return self

    def remote(self, request: EngineRequest) -> FakeResponses:
        return self.responses


def output() -> EngineOutput:
    return EngineOutput(request_id="r1", token_ids=(5,), text="x", num_prompt_tokens=2)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # Regression: cancel() re-raised the BackPressureError, which escaped as Serve's
        # plain-text 503 instead of our OpenAI-shaped one.
        (BackPressureError(num_queued_requests=8, max_queued_requests=8), OverloadedError),
        (ActorDiedError(), UnavailableError),
    ],
)
async def test_handle_errors_become_api_errors(error: Exception, expected: type[Exception]) -> None:
    responses = FakeResponses([], error)
    with pytest.raises(expected):
        async for _ in ServeBackend(FakeHandle(responses)).generate(REQUEST):  # type: ignore[arg-type]
            pass
    assert responses.cancelled


async def test_an_abandoned_stream_is_cancelled_and_a_finished_one_is_not() -> None:
    abandoned = FakeResponses([[output()], [output()]], None)
    stream = ServeBackend(FakeHandle(abandoned)).generate(REQUEST)  # type: ignore[arg-type]
    assert len(await anext(stream)) == 1
    await stream.aclose()  # the client left
    assert abandoned.cancelled

    finished = FakeResponses([[output()]], None)
    batches = [b async for b in ServeBackend(FakeHandle(finished)).generate(REQUEST)]  # type: ignore[arg-type]
    assert len(batches) == 1 and not finished.cancelled
