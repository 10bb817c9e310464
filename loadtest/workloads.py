"""Workloads: the sessions a load test sends, exact to the token in the target model's tokenizer.

Prompts are token ids drawn uniformly from the vocabulary (special ids excluded when a tokenizer is
given), so lengths and shared prefixes are exact and the completions endpoint can send them as is.
Every draw comes from one `random.Random(seed)`: the same flags give the same workload.

  shared-prefix      SGLang's generated-shared-prefix: groups of prompts that share a system prompt
                     (--hot-share: one group takes that share of the prompts, a hot prefix)
  multi-turn         users x turns; each turn carries the whole conversation so far
  prefix-repetition  vLLM's: a few random prefixes, each followed by random suffixes
  random             input and output lengths uniform in ranges
  trace:FILE.jsonl   recorded arrivals, inputs (token counts, token ids or text) and output lengths
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from deployments.tokenizer import PromptTokenizer
from loadtest.argtypes import positive_int
from loadtest.spec import Session, Turn

TRACE_PREFIX = "trace:"


@dataclasses.dataclass(frozen=True)
class LengthRange:
    """A token count, fixed (`N`) or drawn uniformly per request from `MIN:MAX` (inclusive)."""

    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


def parse_length(text: str) -> LengthRange:
    """`N` or `MIN:MAX` as an argparse type."""
    try:
        low, _, high = text.partition(":")
        bounds = LengthRange(int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or MIN:MAX") from None
    if bounds.low < 1 or bounds.high < bounds.low:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= MIN <= MAX")
    return bounds


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in [0, 1]")
    return value


def _workload_name(text: str) -> str:
    if text in WORKLOADS or (text.startswith(TRACE_PREFIX) and len(text) > len(TRACE_PREFIX)):
        return text
    names = ", ".join(WORKLOADS)
    raise argparse.ArgumentTypeError(f"{text!r}: expected one of {names} or trace:FILE.jsonl")


class TokenSource:
    """Random token ids for prompts, from the ids that are plain text in the vocabulary."""

    def __init__(self, vocab_size: int, tokenizer: PromptTokenizer | None, seed: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        ids: Sequence[int] = range(vocab_size)
        if tokenizer is not None:
            # A special id (BOS, EOS, chat markers) would change what the engine does with the
            # prompt; decoding skips special tokens, so they are exactly the ids that decode to "".
            ids = [i for i in ids if tokenizer.decode([i])]
        if not ids:
            raise ValueError("the vocabulary has no plain-text token ids to draw prompts from")
        self._ids = ids
        self.rng = random.Random(seed)

    def draw(self, n: int) -> tuple[int, ...]:
        return tuple(self.rng.choices(self._ids, k=n))


def encode_continuation(tokenizer: PromptTokenizer, text: str) -> list[int]:
    """Text that continues a prompt: tokenized without the special prefix (BOS) a prompt starts
    with, which `encode_text` adds when the model's tokenizer has one."""
    ids = tokenizer.encode_text(text)
    start = tokenizer.encode_text("")
    return ids[len(start) :] if ids[: len(start)] == start else ids


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--workload",
        type=_workload_name,
        default="shared-prefix",
        metavar="NAME",
        help=f"One of {', '.join(WORKLOADS)} (default: shared-prefix), or trace:FILE.jsonl: one "
        "JSON object per line with arrival_s, input_tokens (a count of random tokens or a list "
        "of ids) or text, output_tokens, and an optional session_id (lines of one session are "
        "its turns).",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of prompts, lengths, order and arrivals (default 0).",
    )
    group.add_argument(
        "--num-requests",
        type=positive_int,
        default=None,
        help="Requests to send: caps the workload, or repeats it (new session ids) to reach N. "
        "The count for random and prefix-repetition (default 1000); for multi-turn the last "
        "session is cut short. Default: the workload's own size.",
    )
    group.add_argument(
        "--output-len",
        type=parse_length,
        default=None,
        metavar="N|MIN:MAX",
        help="Output tokens per request of shared-prefix (default 256), prefix-repetition and "
        "random (default 128). Sent with ignore_eos, so each request produces exactly this many.",
    )
    shared = parser.add_argument_group("shared-prefix workload (SGLang generated-shared-prefix)")
    shared.add_argument(
        "--num-groups", type=positive_int, default=64, help="Distinct system prompts (default 64)."
    )
    shared.add_argument(
        "--prompts-per-group",
        type=positive_int,
        default=16,
        help="Prompts that share each system prompt (default 16).",
    )
    shared.add_argument(
        "--system-prompt-len",
        type=positive_int,
        default=2048,
        help="Tokens of each group's system prompt, the shared prefix (default 2048).",
    )
    shared.add_argument(
        "--question-len",
        type=parse_length,
        default=LengthRange(128, 128),
        metavar="N|MIN:MAX",
        help="Tokens of each prompt's own question after the system prompt (default 128).",
    )
    shared.add_argument(
        "--hot-share",
        type=_share,
        default=None,
        metavar="FRACTION",
        help="Make group 0's system prompt hot: this share of the num-groups x prompts-per-group "
        "prompts use it, and the other groups split the rest evenly (default: every group has "
        "prompts-per-group).",
    )
    multi = parser.add_argument_group("multi-turn workload")
    multi.add_argument(
        "--num-users", type=positive_int, default=16, help="Conversations (default 16)."
    )
    multi.add_argument(
        "--turns", type=positive_int, default=5, help="Requests per conversation (default 5)."
    )
    multi.add_argument(
        "--turn-input-len",
        type=parse_length,
        default=LengthRange(128, 128),
        metavar="N|MIN:MAX",
        help="New tokens each turn appends after the history (default 128).",
    )
    multi.add_argument(
        "--turn-output-len",
        type=parse_length,
        default=LengthRange(128, 128),
        metavar="N|MIN:MAX",
        help="Output tokens of each turn (default 128).",
    )
    multi.add_argument(
        "--think-time-s",
        type=float,
        default=1.0,
        help="Seconds between an answer and the user's next turn (default 1).",
    )
    repetition = parser.add_argument_group("prefix-repetition workload (vLLM)")
    repetition.add_argument(
        "--prefix-len",
        type=positive_int,
        default=256,
        help="Tokens of each shared prefix (default 256).",
    )
    repetition.add_argument(
        "--suffix-len",
        type=positive_int,
        default=256,
        help="Tokens of each request's own suffix after its prefix (default 256).",
    )
    repetition.add_argument(
        "--num-prefixes",
        type=positive_int,
        default=10,
        help="Distinct prefixes (default 10); request i uses prefix i mod this, then the order "
        "is shuffled.",
    )
    rand = parser.add_argument_group("random workload")
    rand.add_argument(
        "--input-len",
        type=parse_length,
        default=LengthRange(1024, 1024),
        metavar="N|MIN:MAX",
        help="Prompt tokens per request (default 1024).",
    )


def _output_len(args: argparse.Namespace, default: int) -> LengthRange:
    return args.output_len or LengthRange(default, default)


def _group_sizes(num_groups: int, per_group: int, hot_share: float | None) -> list[int]:
    """Prompts per group: equal, or group 0 taking `hot_share` of them all."""
    if hot_share is None or num_groups == 1:
        return [per_group] * num_groups
    total = num_groups * per_group
    hot = round(hot_share * total)
    cold, extra = divmod(total - hot, num_groups - 1)
    return [hot] + [cold + (1 if i < extra else 0) for i in range(num_groups - 1)]


def _shared_prefix(args: argparse.Namespace, tokens: TokenSource) -> list[Session]:
    output_len = _output_len(args, 256)
    sessions = []
    sizes = _group_sizes(args.num_groups, args.prompts_per_group, args.hot_share)
    for group, size in enumerate(sizes):
        system = tokens.draw(args.system_prompt_len)
        for prompt in range(size):
            question = tokens.draw(args.question_len.draw(tokens.rng))
            turn = Turn(system + question, output_len.draw(tokens.rng))
            sessions.append(Session(f"sp-{group}-{prompt}", (turn,), group=group))
    # SGLang shuffles too: arrivals interleave the groups instead of sending them one by one.
    tokens.rng.shuffle(sessions)
    return sessions


def _multi_turn(args: argparse.Namespace, tokens: TokenSource) -> list[Session]:
    sessions = []
    for user in range(args.num_users):
        turns = tuple(
            Turn(
                tokens.draw(args.turn_input_len.draw(tokens.rng)),
                args.turn_output_len.draw(tokens.rng),
            )
            for _ in range(args.turns)
        )
        sessions.append(Session(f"user-{user}", turns, think_time_s=args.think_time_s))
    return sessions


def _prefix_repetition(args: argparse.Namespace, tokens: TokenSource) -> list[Session]:
    output_len = _output_len(args, 128)
    prefixes = [tokens.draw(args.prefix_len) for _ in range(args.num_prefixes)]
    count = args.num_requests or 1000
    sessions = []
    # vLLM sends num_requests // num_prefixes per prefix; cycling the prefixes keeps the exact
    # count the user asked for, and the shares differ by at most one.
    for i in range(count):
        group = i % args.num_prefixes
        turn = Turn(prefixes[group] + tokens.draw(args.suffix_len), output_len.draw(tokens.rng))
        sessions.append(Session(f"pr-{i}", (turn,), group=group))
    tokens.rng.shuffle(sessions)
    return sessions


def _random(args: argparse.Namespace, tokens: TokenSource) -> list[Session]:
    output_len = _output_len(args, 128)
    return [
        Session(
            f"rand-{i}",
            (Turn(tokens.draw(args.input_len.draw(tokens.rng)), output_len.draw(tokens.rng)),),
        )
        for i in range(args.num_requests or 1000)
    ]


def _trace_input(
    line: dict[str, object],
    where: str,
    first_turn: bool,
    tokens: TokenSource,
    tokenizer: PromptTokenizer | None,
) -> tuple[int, ...]:
    text = line.get("text")
    if text is not None:
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: text must be a non-empty string")
        if tokenizer is None:
            raise ValueError(f"{where}: text needs a tokenizer")
        # A later turn continues the conversation, so only the first carries the prompt's BOS.
        ids = tokenizer.encode_text(text) if first_turn else encode_continuation(tokenizer, text)
        return tuple(ids)
    value = line.get("input_tokens")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return tokens.draw(value)
    if isinstance(value, list) and value and all(isinstance(i, int) and i >= 0 for i in value):
        return tuple(value)
    raise ValueError(f"{where}: needs text, or input_tokens as a count >= 1 or a list of ids")


def load_trace(path: Path, tokens: TokenSource, tokenizer: PromptTokenizer | None) -> list[Session]:
    """Sessions from a JSONL trace, ordered by their first arrival.

    One object per line: `arrival_s` (seconds from the start), `input_tokens` (a count of random
    tokens or a list of token ids) or `text`, `output_tokens`, and optionally `session_id`. Lines
    of one session are its turns in file order; each turn's input is what it appends after the
    conversation so far.
    """
    turns: dict[str, list[Turn]] = {}
    with path.open() as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON: {exc}") from None
            if not isinstance(line, dict):
                raise ValueError(f"{where}: expected a JSON object")
            arrival = line.get("arrival_s")
            if isinstance(arrival, bool) or not isinstance(arrival, int | float) or arrival < 0:
                raise ValueError(f"{where}: arrival_s must be a number >= 0")
            output = line.get("output_tokens")
            if isinstance(output, bool) or not isinstance(output, int) or output < 1:
                raise ValueError(f"{where}: output_tokens must be an integer >= 1")
            session_id = str(line.get("session_id") or f"trace-{number}")
            history = turns.setdefault(session_id, [])
            prompt = _trace_input(line, where, not history, tokens, tokenizer)
            history.append(Turn(prompt, output, arrival_s=float(arrival)))
    if not turns:
        raise ValueError(f"{path}: the trace is empty")
    sessions = [Session(session_id, tuple(t)) for session_id, t in turns.items()]
    return sorted(sessions, key=_first_arrival)


def _first_arrival(session: Session) -> float:
    return session.turns[0].arrival_s or 0.0


def _shift(session: Session, copy: int, offset_s: float) -> Session:
    turns = tuple(
        dataclasses.replace(t, arrival_s=None if t.arrival_s is None else t.arrival_s + offset_s)
        for t in session.turns
    )
    return dataclasses.replace(session, session_id=f"{session.session_id}.r{copy}", turns=turns)


def fit_to_count(sessions: list[Session], count: int) -> list[Session]:
    """Exactly `count` requests: the sessions in order, repeated (with new ids and, for traces,
    arrivals shifted by one trace period per copy) as needed; the last session is cut short."""
    if not sessions:
        raise ValueError("the workload has no sessions")
    arrivals = [_first_arrival(s) for s in sessions]
    # One period is the trace's span plus one mean gap, so the copies keep the trace's rate.
    span = arrivals[-1] - arrivals[0]
    period = span + (span / (len(arrivals) - 1) if len(arrivals) > 1 else 0.0)
    fitted: list[Session] = []
    remaining = count
    position = 0
    while remaining > 0:
        copy, index = divmod(position, len(sessions))
        current = sessions[index] if copy == 0 else _shift(sessions[index], copy, copy * period)
        if len(current.turns) > remaining:
            current = dataclasses.replace(current, turns=current.turns[:remaining])
        fitted.append(current)
        remaining -= len(current.turns)
        position += 1
    return fitted


Builder = Callable[[argparse.Namespace, TokenSource], list[Session]]

WORKLOADS: dict[str, Builder] = {
    "shared-prefix": _shared_prefix,
    "multi-turn": _multi_turn,
    "prefix-repetition": _prefix_repetition,
    "random": _random,
}


def build_workload(
    args: argparse.Namespace, vocab_size: int, tokenizer: PromptTokenizer | None
) -> list[Session]:
    """The sessions `args` (from `add_workload_arguments`) describe; the same args, the same
    sessions."""
    tokens = TokenSource(vocab_size, tokenizer, args.seed)
    if args.workload.startswith(TRACE_PREFIX):
        sessions = load_trace(Path(args.workload[len(TRACE_PREFIX) :]), tokens, tokenizer)
    else:
        sessions = WORKLOADS[args.workload](args, tokens)
    return sessions if args.num_requests is None else fit_to_count(sessions, args.num_requests)
