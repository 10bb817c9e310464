"""`loadtest run`: load an OpenAI-compatible endpoint and write a report.

    loadtest run --base-url http://127.0.0.1:8000 --workload shared-prefix --rate 4 --out runs/a

Builds the workload (token-exact with --tokenizer), schedules it (--rate/--stages/--concurrency),
streams every request, then writes OUT/summary.json, OUT/requests.jsonl, OUT/report.md and plots,
and prints the summary. Exit 0 when at least one request completed, 1 when none did, 2 for
bad arguments or an unreachable target.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from cluster.cli import EXIT_INTERRUPTED
from cluster.embedded_model import ensure_embedded_model
from deployments.tokenizer import PromptTokenizer
from loadtest.argtypes import finite_positive_float
from loadtest.arrivals import add_arrival_arguments, build_arrivals
from loadtest.client import Endpoint, run_load
from loadtest.metrics import SloWindows, summarize
from loadtest.report import add_output_arguments, summary_table, write_report
from loadtest.workloads import add_workload_arguments, build_workload

API_KEY_ENV = "OPENAI_API_KEY"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="Load an OpenAI-compatible endpoint and report latency and throughput.",
        description=__doc__.split("\n\n")[0],
    )
    target = parser.add_argument_group("target")
    target.add_argument(
        "--base-url",
        required=True,
        help="The server's base URL, e.g. http://127.0.0.1:8000 (paths /v1/... are appended).",
    )
    target.add_argument(
        "--model", default=None, help="Model id to request (default: the first of GET /v1/models)."
    )
    target.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="completions sends token ids (token-exact); chat sends the decoded text as messages "
        "(the server re-tokenizes it and adds its chat template). Default: completions.",
    )
    target.add_argument(
        "--tokenizer",
        default=None,
        help="Local folder of the target model's tokenizer (default: the embedded tiny Llama's).",
    )
    target.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"Bearer token (default: ${API_KEY_ENV}); never written to the report.",
    )
    target.add_argument(
        "--timeout-s", type=float, default=600.0, help="Deadline of one request (default 600)."
    )
    target.add_argument(
        "--duration-s",
        type=float,
        default=None,
        help="Start no request after this many seconds; running ones finish (default: no cap).",
    )
    output = add_output_arguments(parser, "loadtest-runs/<date-time>")
    output.add_argument(
        "--stop-at-slo-miss",
        type=finite_positive_float,
        default=None,
        metavar="WINDOW_S",
        help="End the run as soon as a WINDOW_S window of request starts has missed "
        "--slo-ttft-ms at p95 for certain (a failed request counts as an infinite TTFT); the "
        "requests in flight are cut, the rest not sent (`loadtest capacity` uses it).",
    )
    output.add_argument(
        "--stop-at-slo-miss-until-s",
        type=finite_positive_float,
        default=None,
        metavar="S",
        help="With --stop-at-slo-miss: only windows that end by S seconds count (`loadtest "
        "capacity` passes its hold; default: every window).",
    )
    output.add_argument(
        "--no-progress", action="store_true", help="No progress bar on stderr while running."
    )
    add_workload_arguments(parser)
    add_arrival_arguments(parser)
    parser.set_defaults(handler=functools.partial(handle, parser=parser))


def _command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that repeats this run: every flag of `run` whose value is not its default
    (flags are named after their destinations here), with the API key's value hidden."""
    # `args` also holds the top-level parser's entries; only this parser's flags belong here.
    own = vars(parser.parse_args(["--base-url", "-"]))
    words = ["loadtest", "run"]
    for dest, value in vars(args).items():
        if dest not in own or dest == "handler" or value == parser.get_default(dest):
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            words.append(flag)
        elif dest == "api_key":
            words += [flag, "***"]
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            words += [flag, text]
    return shlex.join(words)


async def _first_model(base_url: str, api_key: str | None, timeout_s: float) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False, headers=headers) as http:
        response = await http.get(base_url.rstrip("/") + "/v1/models")
        response.raise_for_status()
        models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model")
    return str(models[0]["id"])


def handle(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        if args.stop_at_slo_miss is not None and args.slo_ttft_ms is None:
            raise ValueError("--stop-at-slo-miss needs --slo-ttft-ms")
        if args.stop_at_slo_miss_until_s is not None and args.stop_at_slo_miss is None:
            raise ValueError("--stop-at-slo-miss-until-s needs --stop-at-slo-miss")
        plan = build_arrivals(args)
        tokenizer = PromptTokenizer(args.tokenizer or str(ensure_embedded_model()))
        sessions = build_workload(args, tokenizer.vocab_size, tokenizer)
    except (ValueError, OSError) as exc:
        print(f"loadtest run: error: {exc}", file=sys.stderr)
        return 2
    try:
        model = args.model or asyncio.run(
            _first_model(args.base_url, args.api_key, min(args.timeout_s, 30.0))
        )
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"loadtest run: cannot list models at {args.base_url}: {exc}", file=sys.stderr)
        return 2
    endpoint: Endpoint = args.endpoint
    # Ctrl-C ends the run early (asyncio.run cancels it): the requests that ended are reported.
    run = asyncio.run(
        run_load(
            args.base_url,
            model,
            sessions,
            plan,
            endpoint=endpoint,
            api_key=args.api_key,
            timeout_s=args.timeout_s,
            tokenizer=tokenizer,
            progress=not args.no_progress,
            duration_s=args.duration_s,
            seed=args.seed,
            stop_at_slo_miss=None
            if args.stop_at_slo_miss is None
            else SloWindows(
                args.slo_ttft_ms / 1000.0,
                args.stop_at_slo_miss,
                args.stop_at_slo_miss_until_s or math.inf,
            ),
        )
    )
    summary = {
        "command": _command_line(parser, args),
        "target": f"{args.base_url} model {model} ({endpoint})",
        "workload": f"{args.workload}: {len(sessions)} sessions, "
        f"{sum(len(s.turns) for s in sessions)} requests, seed {args.seed}",
        "arrivals": plan.describe(),
        **summarize(run.records, run.duration_s, args.slo_ttft_ms, args.slo_tpot_ms),
        "not_sent": run.not_sent,
    }
    if run.cut_by_interrupt is not None:
        summary["cut_by_interrupt"] = run.cut_by_interrupt
    if run.slo_missed_window is not None:
        summary["slo_missed_window_s"] = run.slo_missed_window * args.stop_at_slo_miss
        summary["cut_at_slo_miss"] = run.cut_at_slo_miss
    out = args.out or Path("loadtest-runs") / time.strftime("%Y%m%d-%H%M%S")
    write_report(out, summary, run.records)
    print(summary_table(summary))
    print(f"\nwrote {out}/ (summary.json, requests.jsonl, report.md, plots)")
    if run.cut_by_interrupt is not None:
        print(
            f"interrupted: the report has the {len(run.records)} requests that ended; "
            f"{run.cut_by_interrupt} in flight were cut, {run.not_sent} not sent",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if run.slo_missed_window is not None:
        print(
            f"stopped at {run.duration_s:.1f} s: the window of requests started from "
            f"{summary['slo_missed_window_s']:g} s missed TTFT p95 <= {args.slo_ttft_ms:g} ms; "
            f"{run.cut_at_slo_miss} in flight were cut, {run.not_sent} not sent",
            file=sys.stderr,
        )
    return 0 if summary["completed"] else 1
