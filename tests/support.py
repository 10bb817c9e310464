"""Helpers shared by the test suites."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from deployments.engines.base import Engine, EngineOutput, EngineRequest, EngineStats


class EngineBackend:
    """A ModelBackend over an in-process engine: the API without Ray."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        async for output in self.engine.generate(request):
            yield [output]

    async def stats(self) -> EngineStats:
        await self.engine.check_health()
        return self.engine.stats()


def parse_sse(body: str) -> tuple[list[dict], bool]:
    """The JSON events of an SSE body, and whether it ended with [DONE]."""
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line.strip()]
    done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done
