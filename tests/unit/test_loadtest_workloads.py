"""loadtest.workloads: exact lengths, what is shared, reproducible seeds, traces."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest

from deployments.tokenizer import PromptTokenizer
from loadtest.spec import Session
from loadtest.workloads import (
    WORKLOADS,
    add_workload_arguments,
    build_workload,
    encode_continuation,
)

VOCAB = 50_000  # large, so that two random tokens agreeing by chance is negligible


def workload(*argv: str, tokenizer: PromptTokenizer | None = None) -> list[Session]:
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    args = parser.parse_args(list(argv))
    vocab = tokenizer.vocab_size if tokenizer is not None else VOCAB
    return build_workload(args, vocab, tokenizer)


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture(scope="module")
def tokenizer(embedded_model: Path) -> PromptTokenizer:
    return PromptTokenizer(str(embedded_model))


SHARED = (
    "--workload=shared-prefix",
    "--num-groups=4",
    "--prompts-per-group=3",
    "--system-prompt-len=50",
    "--question-len=10",
    "--output-len=7",
)


def test_registry_names() -> None:
    assert set(WORKLOADS) == {"shared-prefix", "multi-turn", "prefix-repetition", "random"}


def test_shared_prefix_shape_and_sharing() -> None:
    sessions = workload(*SHARED)
    assert len(sessions) == 12
    assert Counter(s.group for s in sessions) == {0: 3, 1: 3, 2: 3, 3: 3}
    for s in sessions:
        (turn,) = s.turns
        assert len(turn.prompt_token_ids) == 60 and turn.max_tokens == 7
    for a in sessions:
        for b in sessions:
            if a is b:
                continue
            shared = common_prefix(a.turns[0].prompt_token_ids, b.turns[0].prompt_token_ids)
            # same group: exactly the system prompt; other groups: nothing of it
            assert shared == (50 if a.group == b.group else 0), (a.session_id, b.session_id)
    # shuffled like SGLang's, not group after group
    assert [s.group for s in sessions] != sorted(s.group for s in sessions)


def test_shared_prefix_defaults_are_sglangs() -> None:
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    args = parser.parse_args([])
    assert (args.workload, args.num_groups, args.prompts_per_group) == ("shared-prefix", 64, 16)
    assert (args.system_prompt_len, str(args.question_len)) == (2048, "128")
    sessions = workload("--num-groups=2", "--prompts-per-group=2")
    assert {len(s.turns[0].prompt_token_ids) for s in sessions} == {2048 + 128}
    assert {s.turns[0].max_tokens for s in sessions} == {256}


def test_length_ranges() -> None:
    sessions = workload(
        "--workload=random", "--num-requests=300", "--input-len=5:9", "--output-len=2:4"
    )
    assert len(sessions) == 300
    assert {len(s.turns[0].prompt_token_ids) for s in sessions} == {5, 6, 7, 8, 9}
    assert {s.turns[0].max_tokens for s in sessions} == {2, 3, 4}
    with pytest.raises(SystemExit):
        workload("--workload=random", "--input-len=9:5")


def test_random_workload_draws_fresh_tokens() -> None:
    sessions = workload("--workload=random", "--num-requests=20", "--input-len=64")
    assert len({s.turns[0].prompt_token_ids for s in sessions}) == 20
    assert all(0 <= t < VOCAB for s in sessions for t in s.turns[0].prompt_token_ids)


def test_multi_turn_shape() -> None:
    sessions = workload(
        "--workload=multi-turn",
        "--num-users=3",
        "--turns=4",
        "--turn-input-len=20",
        "--turn-output-len=5",
        "--think-time-s=0.5",
    )
    assert [s.session_id for s in sessions] == ["user-0", "user-1", "user-2"]
    for s in sessions:
        assert len(s.turns) == 4 and s.think_time_s == 0.5
        assert all(len(t.prompt_token_ids) == 20 and t.max_tokens == 5 for t in s.turns)
        # each turn's new content is its own: the history is added when the turn is sent
        assert len({t.prompt_token_ids for t in s.turns}) == 4


def test_prefix_repetition_shares_prefixes() -> None:
    sessions = workload(
        "--workload=prefix-repetition",
        "--num-requests=25",
        "--num-prefixes=4",
        "--prefix-len=30",
        "--suffix-len=10",
        "--output-len=3",
    )
    assert len(sessions) == 25
    assert sorted(Counter(s.group for s in sessions).values()) == [6, 6, 6, 7]
    for a in sessions:
        assert len(a.turns[0].prompt_token_ids) == 40 and a.turns[0].max_tokens == 3
        for b in sessions:
            if a is not b:
                shared = common_prefix(a.turns[0].prompt_token_ids, b.turns[0].prompt_token_ids)
                assert shared == (30 if a.group == b.group else 0)


@pytest.mark.parametrize(
    "argv",
    [
        SHARED,
        ("--workload=multi-turn", "--num-users=2", "--turns=2"),
        ("--workload=prefix-repetition", "--num-requests=10"),
        ("--workload=random", "--num-requests=10", "--input-len=4:40"),
    ],
)
def test_seeds_reproduce_and_differ(argv: tuple[str, ...]) -> None:
    assert workload(*argv, "--seed=3") == workload(*argv, "--seed=3")
    assert workload(*argv, "--seed=3") != workload(*argv, "--seed=4")


def test_tokenizer_excludes_special_ids(tokenizer: PromptTokenizer) -> None:
    sessions = workload(
        "--workload=random", "--num-requests=50", "--input-len=200", tokenizer=tokenizer
    )
    ids = {t for s in sessions for t in s.turns[0].prompt_token_ids}
    # the embedded tokenizer's specials are 0, 1, 2 (<|endoftext|>, <|im_start|>, <|im_end|>)
    assert ids.isdisjoint({0, 1, 2})
    assert max(ids) < tokenizer.vocab_size
    assert len(ids) > 1000  # drawn across the vocabulary, not from a corner of it


def test_num_requests_caps_and_repeats() -> None:
    capped = workload(*SHARED, "--num-requests=5")
    assert capped == workload(*SHARED)[:5]
    repeated = workload(*SHARED, "--num-requests=30")
    assert len(repeated) == 30
    assert len({s.session_id for s in repeated}) == 30
    assert [s.turns for s in repeated[12:24]] == [s.turns for s in repeated[:12]]


def test_num_requests_cuts_the_last_conversation_short() -> None:
    sessions = workload("--workload=multi-turn", "--num-users=3", "--turns=4", "--num-requests=10")
    assert [len(s.turns) for s in sessions] == [4, 4, 2]


def write_trace(path: Path, lines: list[dict[str, object]]) -> str:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return f"--workload=trace:{path}"


def test_trace_parsing(tmp_path: Path, tokenizer: PromptTokenizer) -> None:
    flag = write_trace(
        tmp_path / "t.jsonl",
        [
            {"arrival_s": 0.5, "text": "hello world", "output_tokens": 4, "session_id": "chat"},
            {"arrival_s": 0.0, "input_tokens": 12, "output_tokens": 3},
            {"arrival_s": 2.0, "input_tokens": [7, 8, 9], "output_tokens": 2},
            {"arrival_s": 3.0, "text": "the cache", "output_tokens": 5, "session_id": "chat"},
        ],
    )
    sessions = workload(flag, tokenizer=tokenizer)
    # ordered by first arrival; lines of one session are its turns in file order
    assert [s.session_id for s in sessions] == ["trace-2", "chat", "trace-3"]
    first, chat, third = sessions
    assert len(first.turns[0].prompt_token_ids) == 12 and first.turns[0].max_tokens == 3
    assert first.turns[0].arrival_s == 0.0
    assert [t.arrival_s for t in chat.turns] == [0.5, 3.0]
    assert list(chat.turns[0].prompt_token_ids) == tokenizer.encode_text("hello world")
    assert list(chat.turns[1].prompt_token_ids) == encode_continuation(tokenizer, "the cache")
    assert [t.max_tokens for t in chat.turns] == [4, 5]
    assert third.turns[0].prompt_token_ids == (7, 8, 9)


def test_trace_repeats_shift_arrivals(tmp_path: Path) -> None:
    flag = write_trace(
        tmp_path / "t.jsonl",
        [{"arrival_s": float(i), "input_tokens": 4, "output_tokens": 1} for i in range(3)],
    )
    sessions = workload(flag, "--num-requests=7")
    # one period is the span (2 s) plus the mean gap (1 s)
    assert [s.turns[0].arrival_s for s in sessions] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"arrival_s": 0, "input_tokens": 3}, "output_tokens"),
        ({"input_tokens": 3, "output_tokens": 1}, "arrival_s"),
        ({"arrival_s": 0, "output_tokens": 1}, "input_tokens"),
        ({"arrival_s": 0, "input_tokens": 0, "output_tokens": 1}, "input_tokens"),
        ({"arrival_s": 0, "text": "hi", "output_tokens": 1}, "tokenizer"),
    ],
)
def test_trace_errors_name_the_line(tmp_path: Path, line: dict[str, object], message: str) -> None:
    flag = write_trace(
        tmp_path / "bad.jsonl", [{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}, line]
    )
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        workload(flag)


def test_unknown_workload_is_refused() -> None:
    with pytest.raises(SystemExit):
        workload("--workload=sharegpt")
