"""Property-based fuzzing of the OpenAI app in process: no input gets a 5xx (issue 7).

Derandomized (the same examples every run, so CI cannot flake); a wider local search:
`HYPOTHESIS_FUZZ_EXAMPLES=5000 pytest tests/unit/test_fuzz_api.py`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.config import RouterConfig
from tests.fuzz import CHAT_PATH, COMPLETIONS_PATH, check_answer, encode, raw_bodies, requests
from tests.support import API_MODEL, simulated_api

EXAMPLES = int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,  # no .hypothesis folder in the tree
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Post = Callable[[str, bytes, dict[str, str]], tuple[int, str, str]]


@pytest.fixture(scope="module")
def post(embedded_model: Path) -> Iterator[Post]:
    """Posts to one app for the whole module (hypothesis runs its examples inside one test)."""
    loop = asyncio.new_event_loop()
    api = simulated_api(embedded_model, RouterConfig(max_body_bytes=16 * 1024))
    http, _ = loop.run_until_complete(api.__aenter__())

    def send(path: str, content: bytes, headers: dict[str, str]) -> tuple[int, str, str]:
        response = loop.run_until_complete(http.post(path, content=content, headers=headers))
        return response.status_code, response.headers.get("content-type", ""), response.text

    try:
        yield send
    finally:
        # The exit checks that no engine request outlived its response.
        loop.run_until_complete(api.__aexit__(None, None, None))
        loop.close()


@FUZZ
@given(request=requests(API_MODEL))
def test_mutated_requests_never_get_a_5xx(post: Post, request: tuple[str, dict[str, Any]]) -> None:
    path, body = request
    check_answer(*post(path, encode(body), {"content-type": "application/json"}))


@FUZZ
@given(
    path=st.sampled_from([CHAT_PATH, COMPLETIONS_PATH]),
    content=raw_bodies(),
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/x+json"]),
)
def test_arbitrary_bodies_never_get_a_5xx(
    post: Post, path: str, content: bytes, content_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    check_answer(*post(path, content, headers))
