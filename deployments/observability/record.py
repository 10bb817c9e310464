"""What one request did, as the router saw it: the source of its metrics and access-log line.

Pure (no Ray, no OpenTelemetry): the clock is injected, so the derived timings are tested with
fake time. The record of the request being served is in a context variable, so the few places
that learn something (the engine stream, the routing decision) need no extra arguments.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from deployments.engines.base import EngineOutput

Clock = Callable[[], float]

UNKNOWN = "unknown"


@dataclass
class RequestRecord:
    clock: Clock
    method: str
    path: str
    http_request_id: str | None = None
    start: float = field(init=False)
    model: str | None = None
    tenant: str | None = None
    request_id: str | None = None
    replica: str | None = None
    status: int | None = None
    # A stream answers 200 before it can fail; its error event's status is the request's outcome.
    stream_error_status: int | None = None
    stream: bool = False
    first_token: float | None = None
    end: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    choice_tokens: dict[int, int] = field(default_factory=dict)  # tokens per choice index

    def __post_init__(self) -> None:
        self.start = self.clock()

    def engine_call(self, model: str, request_id: str, prompt_tokens: int) -> None:
        self.model, self.request_id, self.prompt_tokens = model, request_id, prompt_tokens

    def outputs(self, batch: Iterable[EngineOutput]) -> None:
        """One batch of the engine stream: the first one with tokens marks the first token."""
        for output in batch:
            if output.token_ids and self.first_token is None:
                self.first_token = self.clock()
            tokens = self.choice_tokens.get(output.index, 0)
            self.choice_tokens[output.index] = tokens + len(output.token_ids)
            self.prompt_tokens = max(self.prompt_tokens, output.num_prompt_tokens)
            self.cached_tokens = max(self.cached_tokens, output.num_cached_tokens)
            self.replica = output.replica or self.replica

    def finish(self, status: int) -> None:
        """The request is over: `status` is the HTTP one, which a stream's error replaces."""
        if self.stream_error_status is not None and status == 200:
            status = self.stream_error_status
        self.status, self.end = status, self.clock()

    @property
    def completion_tokens(self) -> int:
        """Output tokens over every choice (usage's completion_tokens)."""
        return sum(self.choice_tokens.values())

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.start) * 1000

    @property
    def e2e_ms(self) -> float | None:
        return None if self.end is None else (self.end - self.start) * 1000

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT), per choice: the n choices
        of a request decode side by side, so the time is over the longest choice's tokens (over
        all of them, n = 4 read 4x faster); None below 2 tokens."""
        longest = max(self.choice_tokens.values(), default=0)
        if self.first_token is None or self.end is None or longest < 2:
            return None
        return (self.end - self.first_token) * 1000 / (longest - 1)

    @property
    def is_generation(self) -> bool:
        """A completions or chat request (the ones with a model, tokens and timings)."""
        return self.method == "POST" and self.path.startswith("/v1/")


class RequestSink(Protocol):
    """Where finished requests go (metrics, logs)."""

    def request_finished(self, record: RequestRecord) -> None: ...


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "inference_cluster_request", default=None
)


def current() -> RequestRecord | None:
    """The record of the request this task serves (None outside a request, e.g. in unit tests
    that call the app without the observing middleware)."""
    return _current.get()


def set_current(record: RequestRecord | None) -> contextvars.Token[RequestRecord | None]:
    return _current.set(record)


def reset_current(token: contextvars.Token[RequestRecord | None]) -> None:
    _current.reset(token)
