"""`loadtest run`: the HTTP client on a mock transport (stream parsing, history, failures), then the
whole command against the app with simulated engines."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.tokenizer import PromptTokenizer
from loadtest import client, report
from loadtest.arrivals import ArrivalPlan
from loadtest.client import run_load
from loadtest.metrics import SloWindows, summarize
from loadtest.report import write_report
from loadtest.spec import RequestRecord, Session, Turn
from loadtest.workloads import encode_continuation

Handler = Callable[[httpx.Request], Any]


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events
    )


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def completion_stream(texts: list[str], prompt: int, cached: int = 0) -> bytes:
    chunks = [{"choices": [{"index": 0, "text": t}]} for t in texts]
    return sse(*chunks, usage(prompt, len(texts), cached), "[DONE]")


def run(
    handler: Handler,
    sessions: list[Session],
    plan: ArrivalPlan | None = None,
    **options: Any,
) -> list[RequestRecord]:
    result = asyncio.run(
        run_load(
            "http://test",
            "sim",
            sessions,
            plan or ArrivalPlan("poisson"),
            progress=False,
            transport=httpx.MockTransport(handler),
            **options,
        )
    )
    assert result.duration_s > 0 and result.cut_by_interrupt is None
    return result.records


def one_turn(i: int, ids: tuple[int, ...] = (5, 6, 7), max_tokens: int = 3) -> Session:
    return Session(f"s{i}", (Turn(ids, max_tokens),))


def test_completions_stream_is_token_exact_and_parsed() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        bodies.append(json.loads(request.content))
        return httpx.Response(200, content=completion_stream(["a", "b", "c"], 3, cached=2))

    (record,) = run(handler, [one_turn(0)])
    assert bodies == [
        {
            "model": "sim",
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "prompt": [5, 6, 7],
            "max_tokens": 3,
        }
    ]
    assert record.ok and record.status == 200
    assert (record.prompt_tokens, record.output_tokens, record.cached_tokens) == (3, 3, 2)
    assert len(record.token_times_s) == 3  # the usage chunk carries no token
    assert record.start_s <= record.token_times_s[0] <= record.token_times_s[-1] <= record.end_s


def test_chat_history_carries_the_answers(embedded_model: Path) -> None:
    tokenizer = PromptTokenizer(str(embedded_model))
    turn_ids = (tuple(tokenizer.encode_text("hello world")), tuple(tokenizer.encode_text("cache")))
    session = Session("chat", tuple(Turn(ids, 2) for ids in turn_ids), think_time_s=0.01)
    sent: list[list[dict[str, str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        sent.append(json.loads(request.content)["messages"])
        role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        tokens = [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in ("x", "y")]
        return httpx.Response(200, content=sse(role, *tokens, usage(9, 2, 0), "[DONE]"))

    records = run(handler, [session], endpoint="chat", tokenizer=tokenizer)
    assert [r.turn for r in records] == [0, 1]
    assert all(r.ok and len(r.token_times_s) == 2 for r in records)  # the role chunk is no token
    assert sent == [
        [{"role": "user", "content": "hello world"}],
        [
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "xy"},
            {"role": "user", "content": "cache"},
        ],
    ]
    assert records[1].start_s >= records[0].end_s + 0.01  # think time


def test_completions_history_is_prompt_answer_then_new_turn(embedded_model: Path) -> None:
    tokenizer = PromptTokenizer(str(embedded_model))
    session = Session("conv", (Turn((10, 11), 2), Turn((12,), 2)))
    prompts: list[list[int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        prompts.append(json.loads(request.content)["prompt"])
        return httpx.Response(200, content=completion_stream([" world", " cache"], 2))

    run(handler, [session], tokenizer=tokenizer)
    answer = encode_continuation(tokenizer, " world cache")
    assert prompts == [[10, 11], [10, 11, *answer, 12]]


def test_failures_become_records_and_the_run_goes_on() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        case = json.loads(request.content)["prompt"][0]
        if case == 1:
            error = {"error": {"message": "overloaded", "type": "server_error"}}
            return httpx.Response(503, json=error)
        if case == 2:
            raise httpx.ConnectError("refused")
        if case == 3:  # an error event after the first token
            chunk = {"choices": [{"index": 0, "text": "a"}]}
            return httpx.Response(200, content=sse(chunk, {"error": {"message": "engine died"}}))
        if case == 4:  # cut off: no [DONE]
            return httpx.Response(200, content=sse({"choices": [{"index": 0, "text": "a"}]}))
        if case == 5:  # no token at all
            return httpx.Response(200, content=sse(usage(1, 0, 0), "[DONE]"))
        if case == 6:
            return httpx.Response(200, content=b"data: {not json\n\n")
        if case == 7:
            return httpx.Response(200, content=sse({"choices": ["not an object"]}, "[DONE]"))
        return httpx.Response(200, content=completion_stream(["a"], 1))

    sessions = [one_turn(i, ids=(i,)) for i in range(8)]
    records = {r.session_id: r for r in run(handler, sessions)}
    assert records["s0"].ok
    assert (records["s1"].status, records["s1"].error) == (503, "overloaded")
    assert records["s2"].status == 0 and "refused" in (records["s2"].error or "")
    assert (records["s3"].status, records["s3"].error) == (200, "engine died")
    assert records["s4"].error == "the stream ended without [DONE]"
    assert records["s5"].error == "the stream carried no token"
    assert "JSONDecodeError" in (records["s6"].error or "")
    assert (records["s7"].error or "").startswith("ValueError: malformed stream event")
    assert not any(records[f"s{i}"].ok for i in range(1, 8))


def test_a_failed_turn_ends_its_session_and_its_later_turns_count_as_not_sent(
    embedded_model: Path,
) -> None:
    """Uncounted, a target that failed early turns looked as if it had fewer to serve."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "boom"}})

    sessions = [
        Session(f"conv{i}", (Turn((1,), 1), Turn((2,), 1), Turn((3,), 1))) for i in range(4)
    ]
    tokenizer = PromptTokenizer(str(embedded_model))
    result = asyncio.run(
        run_load(
            "http://test",
            "sim",
            sessions,
            ArrivalPlan("poisson"),
            progress=False,
            transport=httpx.MockTransport(handler),
            tokenizer=tokenizer,
        )
    )
    assert [r.turn for r in result.records] == [0] * 4
    assert result.not_sent == 8


def test_a_token_whose_text_holds_a_unicode_line_separator_is_one_event() -> None:
    """JSON leaves U+2028, U+2029 and U+0085 unescaped (vLLM's server writes them raw), and
    splitting lines as str.splitlines does cut the event in two: the request failed."""
    texts = ["a\u2028b", "c\u0085d", "e\u2029"]
    chunks = [json.dumps({"choices": [{"index": 0, "text": t}]}, ensure_ascii=False) for t in texts]
    body = "".join(f"data: {c}\r\n\r\n" for c in chunks) + "data: [DONE]\r\n\r\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body.encode())

    (record,) = run(handler, [one_turn(0)])
    assert record.ok and len(record.token_times_s) == 3, record.error


async def test_lines_end_only_at_sse_line_ends_even_across_chunks() -> None:
    class Chunked:
        def __init__(self, *chunks: str) -> None:
            self.chunks = chunks

        async def aiter_text(self) -> AsyncIterator[str]:
            for chunk in self.chunks:
                yield chunk

    async def lines(*chunks: str) -> list[str]:
        return [line async for line in client._lines(Chunked(*chunks))]  # type: ignore[arg-type]

    # A "\r\n" split between two chunks is one line end, not two (which would end the event).
    assert await lines("data: a\r", "\ndata: b\r\n\r\n") == ["data: a", "data: b", ""]
    assert await lines("x\u2028y\ry\nz") == ["x\u2028y", "y", "z"]
    assert await lines("last\r") == ["last"]


def test_multi_turn_needs_a_tokenizer() -> None:
    session = Session("conv", (Turn((1,), 1), Turn((2,), 1)))
    with pytest.raises(ValueError, match="tokenizer"):
        run(lambda request: httpx.Response(500), [session])


def test_timeout_is_per_request() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, content=completion_stream(["a"], 1))

    (record,) = run(handler, [one_turn(0)], timeout_s=0.2)
    assert record.status == 0 and record.error == "timed out after 0.2 s"


@pytest.mark.parametrize(
    "plan",
    [ArrivalPlan("closed", max_concurrency=2), ArrivalPlan("poisson", max_concurrency=2)],
)
def test_concurrency_is_capped(plan: ArrivalPlan) -> None:
    in_flight = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, content=completion_stream(["a", "b"], 3))

    records = run(handler, [one_turn(i) for i in range(8)], plan)
    assert len(records) == 8 and all(r.ok for r in records)
    assert peak == 2


def test_duration_cap_stops_new_requests() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=completion_stream(["a"], 1))

    plan = ArrivalPlan("constant", rate=10.0)  # one every 0.1 s; the cap lets about 3 start
    result = asyncio.run(
        run_load(
            "http://test",
            "sim",
            [one_turn(i) for i in range(50)],
            plan,
            progress=False,
            transport=httpx.MockTransport(handler),
            duration_s=0.25,
        )
    )
    assert 1 <= len(result.records) <= 4
    assert result.not_sent == 50 - len(result.records)


@pytest.fixture
def interrupt_after() -> Iterator[Callable[[float], None]]:
    """interrupt_after(seconds): a Ctrl-C to this process then, met as in a terminal: by Python's
    default SIGINT handler, which asyncio.run turns into a cancellation of its task. (A library an
    earlier test ran in this process, such as vLLM's engine, may have left its own handler.) A
    Ctrl-C still pending when the test ends is called off."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    timers: list[threading.Timer] = []

    def interrupt(seconds: float) -> None:
        timers.append(threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT)))
        timers[-1].start()

    yield interrupt
    for timer in timers:
        timer.cancel()
    signal.signal(signal.SIGINT, saved)


@pytest.mark.parametrize(
    "plan", [ArrivalPlan("constant", rate=20.0), ArrivalPlan("closed", max_concurrency=4)]
)
def test_ctrl_c_keeps_the_requests_that_ended_and_counts_the_cut_ones(
    plan: ArrivalPlan, interrupt_after: Callable[[float], None]
) -> None:
    """Ctrl-C returns the run so far (it raised KeyboardInterrupt and the report was lost): the
    requests that ended, those in flight cut and counted, the rest not sent."""
    answered = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        if answered == 3:  # the fourth and later requests hang until cut
            await asyncio.sleep(60)
        answered += 1
        return httpx.Response(200, content=completion_stream(["a"], 3))

    sessions = [one_turn(i) for i in range(40)]
    interrupt_after(1.0)
    transport = httpx.MockTransport(handler)
    result = asyncio.run(
        run_load("http://test", "sim", sessions, plan, progress=False, transport=transport)
    )
    assert len(result.records) == 3 and all(r.ok for r in result.records)
    # Closed loop: each of the 4 users holds one hanging request; open loop: about 17 were sent
    # after the first 3 by the time of the Ctrl-C.
    if plan.kind == "closed":
        assert result.cut_by_interrupt == 4
    else:
        assert result.cut_by_interrupt and result.cut_by_interrupt >= 10
    assert len(result.records) + result.cut_by_interrupt + result.not_sent == 40


def test_ctrl_c_amid_think_times_and_streams_accounts_for_every_turn(
    embedded_model: Path, interrupt_after: Callable[[float], None]
) -> None:
    """Multi-turn: at the Ctrl-C some sessions stream their second turn and others wait out a
    think time. Every turn is a record, a cut request or not sent (the cancelled gather returned
    as soon as a thinking session ended, before the streaming ones dropped their records)."""
    tokenizer = PromptTokenizer(str(embedded_model))

    async def handler(request: httpx.Request) -> httpx.Response:
        if len(json.loads(request.content)["prompt"]) > 2:  # a later turn hangs until cut
            try:
                await asyncio.sleep(60)
            finally:  # and takes a while to end, as closing a real connection does
                await asyncio.sleep(0.1)
        return httpx.Response(200, content=completion_stream(["a"], 2))

    turns = (Turn((10, 11), 1), Turn((12,), 1), Turn((13,), 1))
    # Second turns start at about 0, 0.5, 1.0, 1.5, ... s: at 1.25 s three stream, five think.
    sessions = [Session(f"s{i}", turns, think_time_s=0.5 * i) for i in range(8)]
    interrupt_after(1.25)
    result = asyncio.run(
        run_load(
            "http://test",
            "sim",
            sessions,
            ArrivalPlan("constant", rate=1000.0),
            tokenizer=tokenizer,
            progress=False,
            transport=httpx.MockTransport(handler),
        )
    )
    assert len(result.records) == 8 and all(r.turn == 0 and r.ok for r in result.records)
    assert result.cut_by_interrupt is not None and 1 <= result.cut_by_interrupt <= 5
    assert len(result.records) + result.cut_by_interrupt + result.not_sent == 24


TEN_PER_SECOND = ArrivalPlan("constant", rate=10.0)


def watched_run(
    handler: Handler, plan: ArrivalPlan = TEN_PER_SECOND
) -> Coroutine[Any, Any, client.LoadRun]:
    """100 requests to `handler` (at 10/s by default), stopped at the first 1 s window that
    missed a TTFT p95 of 0.3 s."""
    return run_load(
        "http://test",
        "sim",
        [one_turn(i) for i in range(100)],
        plan,
        progress=False,
        stop_at_slo_miss=SloWindows(slo_ttft_s=0.3, window_s=1.0),
        transport=httpx.MockTransport(handler),
    )


def test_a_run_stops_at_the_first_window_that_missed_its_slo() -> None:
    """A target that answers the first second's 10 requests, then no more: the run ends once the
    window of the requests it left waiting has missed the SLO for certain, the requests in flight
    cut and counted, the rest of the schedule not sent (it would have run to the end of the
    schedule and then waited out each request's timeout)."""
    answered = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        if answered == 10:  # the queue: no answer from now on
            await asyncio.sleep(60)
        answered += 1
        return httpx.Response(200, content=completion_stream(["a"], 3))

    result = asyncio.run(watched_run(handler))
    assert result.slo_missed_window == 1 and result.cut_by_interrupt is None
    assert len(result.records) == 10 and all(r.ok for r in result.records)
    assert result.cut_at_slo_miss and result.cut_at_slo_miss >= 8  # window 1's, at least
    assert result.not_sent > 0
    assert len(result.records) + result.cut_at_slo_miss + result.not_sent == 100


def test_a_run_that_sends_everything_at_once_stops_too() -> None:
    """`--rate inf` (the default): every arrival at 0 s. A horizon at the schedule's last arrival
    judged no window at all, and the run waited out its requests."""
    answered = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        if answered == 10:
            await asyncio.sleep(60)
        answered += 1
        return httpx.Response(200, content=completion_stream(["a"], 3))

    result = asyncio.run(watched_run(handler, ArrivalPlan("poisson")))
    assert result.slo_missed_window == 0 and result.cut_at_slo_miss == 90
    assert len(result.records) == 10 and result.not_sent == 0


def test_a_ctrl_c_is_reported_as_one_even_if_the_slo_watch_then_finds_a_miss() -> None:
    """The watch runs on while a Ctrl-C cuts the requests in flight; here the cut takes a second,
    in which window 0 misses. That was reported as a stop at the miss (exit 0 or 1, so that
    `capacity` went on to its next probe) instead of an interrupt."""

    async def handler(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.sleep(60)  # nothing answers
        except asyncio.CancelledError:
            await asyncio.sleep(1.0)  # and closing a stream takes a moment
            raise
        raise AssertionError("unreachable")

    async def ctrl_c_at(seconds: float) -> client.LoadRun:
        run = asyncio.create_task(watched_run(handler))
        await asyncio.sleep(seconds)
        run.cancel()  # what asyncio.run does with its task on Ctrl-C
        return await run

    result = asyncio.run(ctrl_c_at(0.7))
    assert result.cut_by_interrupt and result.slo_missed_window is None
    assert result.cut_by_interrupt + result.not_sent == 100


def test_report_writes_json_plots_and_series(tmp_path: Path) -> None:
    records = [
        RequestRecord(0, "a", 0, 0.0, 0.0, 0.5, 200, 10, 3, 4, [0.1, 0.2, 0.4]),
        RequestRecord(1, "b", 0, 0.2, 0.2, 0.3, 503, error="overloaded"),
    ]
    summary = {"command": "loadtest simulate", **summarize(records, 1.0, None, None)}
    summary["rate"] = float("inf")  # JSON has no inf: it becomes null
    write_report(tmp_path, summary, records, {"replicas": [(0.0, 1.0), (0.5, 3.0)]})
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["completed"] == 1 and written["rate"] is None
    assert written["command"] == "loadtest simulate"
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert [RequestRecord(**json.loads(line)) for line in lines] == records
    names = ("latency_cdf", "ttft_over_time", "throughput_over_time", "replicas_over_time")
    for name in names:
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert f"]({name}.png)" in (tmp_path / "report.md").read_text()


def test_a_plot_failure_keeps_the_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> list[str]:
        raise RuntimeError("no backend")

    monkeypatch.setattr(report, "_plot", broken)
    records = [RequestRecord(0, "a", 0, 0.0, 0.0, 0.5, 200, 10, 1, 0, [0.1])]
    write_report(tmp_path, summarize(records, 1.0, None, None), records)
    assert json.loads((tmp_path / "summary.json").read_text())["completed"] == 1
    assert (tmp_path / "requests.jsonl").read_text().count("\n") == 1
    assert "Plots failed: `RuntimeError: no backend`" in (tmp_path / "report.md").read_text()


@pytest.mark.integration
def test_loadtest_run_against_the_simulated_app(simulated_app: str, tmp_path: Path) -> None:
    from loadtest.cli import main

    out = tmp_path / "run"
    argv = [
        "run",
        "--base-url",
        simulated_app,
        "--workload=shared-prefix",
        "--num-groups=4",
        "--prompts-per-group=4",
        "--system-prompt-len=256",
        "--question-len=32",
        "--output-len=16",
        "--rate=8",
        "--seed=1",
        "--slo-ttft-ms=10000",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    for name in ("summary.json", "requests.jsonl", "report.md", "latency_cdf.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 16 and summary["failed"] == 0, summary["errors_by_status"]
    assert summary["output_tokens"] == 16 * 16  # ignore_eos: exactly the asked length
    assert summary["prompt_tokens"] == 16 * (256 + 32)
    assert summary["cached_prompt_token_ratio"] > 0
    assert summary["ttft_ms"]["p50"] > 0 and summary["e2e_ms"]["p99"] > summary["ttft_ms"]["p99"]
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])
    lines = (out / "requests.jsonl").read_text().splitlines()
    records = [RequestRecord(**json.loads(line)) for line in lines]
    assert len(records) == 16 and all(r.ok and r.token_times_s[0] > r.start_s for r in records)
    assert "--rate 8.0" in (out / "report.md").read_text()


@pytest.mark.integration
def test_loadtest_run_interrupted_writes_its_report(
    simulated_app: str, tmp_path: Path, interrupt_after: Callable[[float], None]
) -> None:
    """Ctrl-C two seconds into an eight-second run: exit 130 and a report of what ended (the
    module's teardown checks that the cut streams left nothing in the replicas or routers)."""
    from loadtest.cli import main

    out = tmp_path / "run"
    argv = ["run", "--base-url", simulated_app, "--workload=random", "--input-len=64"]
    argv += ["--output-len=64", "--num-requests=64", "--rate=8", "--no-progress", "--out", str(out)]
    interrupt_after(2.0)
    assert main(argv) == 130
    summary = json.loads((out / "summary.json").read_text())
    records = (out / "requests.jsonl").read_text().splitlines()
    assert summary["completed"] == len(records) > 0 and summary["failed"] == 0
    assert summary["cut_by_interrupt"] + summary["not_sent"] + len(records) == 64
    assert summary["not_sent"] > 0
    assert "cut in flight by Ctrl-C" in (out / "report.md").read_text()


@pytest.mark.integration
def test_loadtest_run_stopped_at_an_slo_miss_writes_its_report(
    simulated_app: str, tmp_path: Path
) -> None:
    """`--stop-at-slo-miss` against the app, with an SLO no request meets (1 ms): the run ends
    when the first window closes, reports it, and exits 0 (the module's teardown checks that the
    cut streams left nothing in the replicas or routers)."""
    from loadtest.cli import main

    out = tmp_path / "run"
    argv = ["run", "--base-url", simulated_app, "--workload=random", "--input-len=64"]
    argv += ["--output-len=64", "--num-requests=64", "--rate=8", "--slo-ttft-ms=1"]
    argv += ["--stop-at-slo-miss=1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = (out / "requests.jsonl").read_text().splitlines()
    assert summary["slo_missed_window_s"] == 0 and summary["not_sent"] > 0
    assert summary["cut_at_slo_miss"] + summary["not_sent"] + len(records) == 64
    assert "stopped: the SLO window starting at (s) missed" in (out / "report.md").read_text()


@pytest.mark.integration
def test_loadtest_capacity_against_the_simulated_app(simulated_app: str, tmp_path: Path) -> None:
    """`loadtest capacity` over HTTP: each probe is a whole `loadtest run` against the app."""
    from loadtest.cli import main

    out = tmp_path / "cap"
    argv = ["capacity", "--target", simulated_app, "--replicas=3", "--hold-s=4", "--window-s=2"]
    # Seeds no other test of this app draws prompts from (its replicas cache theirs).
    argv += ["--low=1", "--high=6", "--resolution=2.5", "--seed=100", "--out", str(out), "--"]
    assert main([*argv, "--workload=random", "--input-len=64", "--output-len=8"]) == 0
    result = json.loads((out / "capacity.json").read_text())
    # 1/s, then the middle of [1, 6]; [3.5, 6] is within the resolution.
    assert [p["rate"] for p in result["probes"]] == [1.0, 3.5]
    for probe in result["probes"]:
        assert probe["sustained"] and probe["failed"] == 0
        assert probe["requests"] == probe["completed"] == math.ceil(probe["rate"] * 4)
        summary = json.loads((out / f"rate-{probe['rate']:g}" / "summary.json").read_text())
        assert summary["completed"] == probe["completed"] and "--rate" in summary["command"]
        # Each probe's prompts are its own: the second's are not the first's, now cached.
        assert summary["cached_prompt_tokens"] == 0
    # Never failed below --high: the capacity is a lower bound.
    assert result["capacity_per_s"] == 3.5 and result["capacity_at_least"]
    assert result["capacity_per_replica_per_s"] == pytest.approx(3.5 / 3)
