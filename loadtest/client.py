"""The HTTP load generator: asyncio + httpx against one OpenAI-compatible base URL.

Every request streams (`stream_options.include_usage`) with `ignore_eos`, so output lengths are the
workload's exactly; the arrival times of the chunks that carry tokens give TTFT and ITL, the final
usage chunk the token counts and cached prompt tokens. A failure of any kind (status, connection,
timeout, error event, a stream without tokens or without [DONE]) becomes a record: the run goes on.

Multi-turn history: turn k's prompt is turn 0's tokens, answer 0, ..., turn k's tokens.
  completions  token ids: the previous prompt's ids, the answer's text re-tokenized with the
               given tokenizer (the server returns text, not ids, so a BPE boundary may differ from
               the ids the engine generated), then the new turn's ids.
  chat         messages: user turns are the decoded token ids, assistant turns the answer text, as
               a chat client would send them; the server applies the chat template.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import httpx
from tqdm import tqdm

from deployments.tokenizer import PromptTokenizer
from loadtest.arrivals import ArrivalPlan, schedule
from loadtest.metrics import SloWindows
from loadtest.spec import RequestRecord, Session, Turn
from loadtest.workloads import encode_continuation

Endpoint = Literal["completions", "chat"]
PATHS: dict[Endpoint, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MAX_ERROR_CHARS = 500  # error bodies go into requests.jsonl: keep them bounded


@dataclass
class _History:
    """What a session has said so far, in the form its endpoint sends."""

    token_ids: list[int] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass
class _Stream:
    """What one streamed response carried."""

    token_times_s: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False


_LINE_END = re.compile(r"\r\n|\r|\n")


async def _lines(response: httpx.Response) -> AsyncIterator[str]:
    """The body's lines, ended by \\n, \\r\\n or \\r only, as SSE ends them. httpx's aiter_lines
    follows str.splitlines, which also ends a line at U+2028, U+2029 and U+0085: JSON leaves them
    unescaped in a token's text (vLLM's server too), and the event was cut and failed to parse."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        # A "\r" at the end may be the first half of a "\r\n": it waits for the next chunk.
        cut = len(buffer) - 1 if buffer.endswith("\r") else len(buffer)
        *lines, rest = _LINE_END.split(buffer[:cut])
        buffer = rest + buffer[cut:]
        for line in lines:
            yield line
    *lines, rest = _LINE_END.split(buffer)
    for line in [*lines, rest] if rest else lines:
        yield line


async def _sse_events(response: httpx.Response) -> AsyncIterator[str]:
    """The data payloads of an SSE stream (multi-line data joined; comments skipped)."""
    data: list[str] = []
    async for line in _lines(response):
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data)
            data = []
    if data:
        yield "\n".join(data)


def _error_message(body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")
    return str(message)[:MAX_ERROR_CHARS]


class LoadClient:
    """Sends turns to one target and turns the responses into records."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        model: str,
        endpoint: Endpoint,
        tokenizer: PromptTokenizer | None,
        timeout_s: float,
        t0: float,
    ) -> None:
        if endpoint == "chat" and tokenizer is None:
            raise ValueError("the chat endpoint sends text: it needs a tokenizer")
        self.http = http
        self.model = model
        self.endpoint = endpoint
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.t0 = t0
        self.records: list[RequestRecord] = []
        # Requests in flight when the run was cut short (Ctrl-C, or a window that missed the SLO
        # with stop_at_slo_miss): dropped from `records`, whose numbers cover only requests that
        # ended.
        self.cut = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _payload(self, history: _History, turn: Turn) -> dict[str, Any]:
        common = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if self.endpoint == "completions":
            prompt = history.token_ids + list(turn.prompt_token_ids)
            return {**common, "prompt": prompt, "max_tokens": turn.max_tokens}
        assert self.tokenizer is not None  # checked in __init__
        user = {"role": "user", "content": self.tokenizer.decode(turn.prompt_token_ids)}
        messages = [*history.messages, user]
        return {**common, "messages": messages, "max_completion_tokens": turn.max_tokens}

    def remember(self, history: _History, turn: Turn, answer: str) -> None:
        assert self.tokenizer is not None  # run_load refuses multi-turn sessions without one
        history.token_ids += turn.prompt_token_ids
        history.token_ids += encode_continuation(self.tokenizer, answer)
        if self.endpoint == "chat":
            history.messages += [
                {"role": "user", "content": self.tokenizer.decode(turn.prompt_token_ids)},
                {"role": "assistant", "content": answer},
            ]

    def _on_event(self, payload: str, stream: _Stream) -> None:
        if payload == "[DONE]":
            stream.done = True
            return
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise ValueError(f"unexpected stream event: {payload[:100]}")
        if "error" in data:
            error = data["error"]
            message = error.get("message") if isinstance(error, dict) else error
            stream.error = str(message)[:MAX_ERROR_CHARS]
            return
        if choices := data.get("choices"):
            choice = choices[0]
            if self.endpoint == "chat":
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                # The opening chunk (role, empty content) carries no token; counting it would
                # make TTFT the time to the role, not to the first token.
                if "role" in delta and not text:
                    return
            else:
                text = choice.get("text") or ""
            stream.token_times_s.append(self.now())
            stream.text.append(text)
        if usage := data.get("usage"):
            stream.usage = usage

    async def send(
        self, session: Session, turn_index: int, history: _History, scheduled_s: float
    ) -> tuple[RequestRecord, str]:
        """One request; returns its record (also kept in `records`) and the answer text."""
        turn = session.turns[turn_index]
        payload = self._payload(history, turn)
        record = RequestRecord(
            index=len(self.records),
            session_id=session.session_id,
            turn=turn_index,
            scheduled_s=scheduled_s,
            start_s=self.now(),
            end_s=0.0,
            status=0,
            prompt_tokens=len(history.token_ids) + len(turn.prompt_token_ids),
        )
        self.records.append(record)
        stream = _Stream()
        # One list: a run watching its SLO sees the first token of a request still in flight.
        record.token_times_s = stream.token_times_s
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                self.http.stream("POST", PATHS[self.endpoint], json=payload) as response,
            ):
                record.status = response.status_code
                if response.status_code != 200:
                    stream.error = _error_message(await response.aread())
                else:
                    async for event in _sse_events(response):
                        try:
                            self._on_event(event, stream)
                        except (AttributeError, TypeError, IndexError) as exc:
                            # JSON of an unexpected shape: a malformed event, like bad JSON
                            raise ValueError(f"malformed stream event: {event[:100]}") from exc
        except TimeoutError:
            stream.error = f"timed out after {self.timeout_s:g} s"
        except asyncio.CancelledError:
            self.records.remove(record)
            self.cut += 1
            raise
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: a malformed event
            stream.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        record.end_s = self.now()
        if stream.error is None and not stream.token_times_s:
            stream.error = "the stream carried no token"
        elif stream.error is None and not stream.done:
            stream.error = "the stream ended without [DONE]"
        record.error = stream.error
        usage = stream.usage or {}
        record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
        record.output_tokens = usage.get("completion_tokens") or len(stream.token_times_s)
        record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return record, "".join(stream.text)


class _Runner:
    """Drives sessions through a LoadClient: turns in order, think times, slots and deadline."""

    def __init__(
        self,
        client: LoadClient,
        slots: asyncio.Semaphore | None,
        deadline_s: float,
        progress: tqdm,
    ) -> None:
        self.client = client
        self.slots = slots
        self.deadline_s = deadline_s
        self.progress = progress
        # Requests of the workload never sent: the later turns of a session whose turn failed,
        # and what the deadline cut. Counted, so a target that fails early turns does not look
        # as if it had fewer to serve.
        self.not_sent = 0

    async def session(self, session: Session, scheduled_s: float) -> None:
        history = _History()
        for k, turn in enumerate(session.turns):
            if k > 0:
                ready = self.client.now() + session.think_time_s
                scheduled_s = max(ready, turn.arrival_s or 0.0)
                await asyncio.sleep(scheduled_s - self.client.now())
            if self.slots is None:
                record, answer = await self._send(session, k, history, scheduled_s)
            else:
                async with self.slots:  # vLLM's --max-concurrency: the clock starts in the slot
                    record, answer = await self._send(session, k, history, scheduled_s)
            # Without the answer there is no history to carry: the session ends here.
            if record is None or not record.ok:
                sent = record is not None  # a failed turn was sent; one past the deadline not
                self.not_sent += len(session.turns) - k - sent
                return
            if k + 1 < len(session.turns):  # tokenizing runs on the event loop: only if needed
                self.client.remember(history, turn, answer)

    async def _send(
        self, session: Session, k: int, history: _History, scheduled_s: float
    ) -> tuple[RequestRecord | None, str]:
        if self.client.now() >= self.deadline_s:  # --duration-s: nothing new starts after it
            return None, ""
        result = await self.client.send(session, k, history, scheduled_s)
        self.progress.update(1)
        return result

    async def open_loop(self, sessions: Sequence[Session], times: Sequence[float]) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            for i, (session, at) in enumerate(zip(sessions, times, strict=False)):
                if at >= self.deadline_s:
                    self.not_sent += sum(len(s.turns) for s in sessions[i:])
                    break
                await asyncio.sleep(at - self.client.now())
                tasks.append(asyncio.create_task(self.session(session, at)))
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            await _cancel_and_wait(tasks)
            raise

    async def closed_loop(self, sessions: Sequence[Session], users: int) -> None:
        queue = iter(sessions)

        async def user() -> None:
            for session in queue:  # one shared iterator: each session goes to one user
                if self.client.now() >= self.deadline_s:
                    self.not_sent += len(session.turns)
                    return
                await self.session(session, self.client.now())

        tasks = [asyncio.create_task(user()) for _ in range(users)]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            await _cancel_and_wait(tasks)
            raise
        self.not_sent += sum(len(s.turns) for s in queue)  # those no user took


async def _cancel_and_wait(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel the run's tasks and wait until each has ended: a gather cancelled with them returns
    as soon as one has ended, before the others have dropped their records (LoadClient.send)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class LoadRun(NamedTuple):
    records: list[RequestRecord]  # in send order
    duration_s: float  # from the start until the last request ended, as vLLM measures it
    not_sent: int  # requests of the workload never sent (see _Runner.not_sent)
    # Requests in flight when the run was interrupted, not in `records`; None: not interrupted.
    cut_by_interrupt: int | None = None
    # The window (index) whose miss ended the run (SloWindows), and the requests it cut in flight.
    slo_missed_window: int | None = None
    cut_at_slo_miss: int | None = None


async def run_load(
    base_url: str,
    model: str,
    sessions: Sequence[Session],
    plan: ArrivalPlan,
    *,
    endpoint: Endpoint = "completions",
    api_key: str | None = None,
    timeout_s: float = 600.0,
    tokenizer: PromptTokenizer | None = None,
    progress: bool = True,
    duration_s: float | None = None,
    seed: int = 0,
    stop_at_slo_miss: SloWindows | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> LoadRun:
    """Sends the sessions as `plan` schedules them; returns the records, the run's duration and
    how many requests were never sent.

    `duration_s` stops new requests after that many seconds (running ones finish, each within
    `timeout_s`); `seed` seeds the arrival times; `stop_at_slo_miss` ends the run at the first
    window that missed its SLO for certain (a fresh SloWindows per run: it keeps what it has
    judged), since the rest of an overloaded run no longer counts and its queue would take
    minutes to drain; `transport` replaces the network (tests).

    Cancelled (Ctrl-C: asyncio.run cancels its task), or stopped at an SLO miss, it returns
    what ended by then: the requests in flight are cut and counted, the rest count as not sent.
    """
    if tokenizer is None and any(len(s.turns) > 1 for s in sessions):
        raise ValueError("multi-turn sessions need a tokenizer: the answers join the history")
    times = schedule(plan, sessions, random.Random(f"arrivals-{seed}"))
    scheduled = sessions if times is None else sessions[: len(times)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(timeout_s),
        # httpx's default pool of 100 would queue requests inside the client, hiding the wait
        # from the server and adding it to TTFT; the arrival plan alone bounds what is in flight.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        # Only ever the URL given: no proxy from the environment.
        trust_env=False,
        transport=transport,
    ) as http:
        t0 = time.perf_counter()
        client = LoadClient(http, model, endpoint, tokenizer, timeout_s, t0)
        bar = tqdm(
            total=sum(len(s.turns) for s in scheduled),
            unit="req",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        slots = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None
        runner = _Runner(client, slots, duration_s if duration_s is not None else float("inf"), bar)
        load = asyncio.create_task(
            runner.closed_loop(scheduled, plan.max_concurrency or 1)
            if times is None
            else runner.open_loop(scheduled, times)
        )
        watch = None
        if stop_at_slo_miss is not None:
            watch = asyncio.create_task(_stop_at_slo_miss(client, load, stop_at_slo_miss))
        try:
            await load  # cancelled with this task by a Ctrl-C, or by `watch`
        except asyncio.CancelledError:
            total = sum(len(s.turns) for s in scheduled)
            not_sent = total - len(client.records) - client.cut
            # A Ctrl-C is one whatever the watch found while the requests were being cut.
            interrupted = (task := asyncio.current_task()) is not None and task.cancelling() > 0
            if not interrupted and watch is not None and watch.done() and not watch.cancelled():
                return LoadRun(
                    client.records,
                    client.now(),
                    not_sent,
                    slo_missed_window=watch.result(),
                    cut_at_slo_miss=client.cut,
                )
            return LoadRun(client.records, client.now(), not_sent, cut_by_interrupt=client.cut)
        finally:
            if watch is not None:
                watch.cancel()
            bar.close()
        return LoadRun(client.records, client.now(), runner.not_sent)


SLO_WATCH_INTERVAL_S = 0.5


async def _stop_at_slo_miss(
    client: LoadClient, load: asyncio.Task[None], windows: SloWindows
) -> int:
    """Cancels `load` at the first window that missed the SLO for certain; returns its index."""
    while True:
        await asyncio.sleep(SLO_WATCH_INTERVAL_S)
        missed = windows.first_missed(client.records, client.now())
        if missed is not None:
            load.cancel()
            return missed
