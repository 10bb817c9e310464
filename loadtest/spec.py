"""The load test's vocabulary, shared by the HTTP runner and the simulator.

A workload is a list of sessions; a session is one or more turns (one request each). Single-turn
workloads have one-turn sessions. In a multi-turn session, turn k's prompt is the whole history:
turn 0's tokens, answer 0, turn 1's tokens, answer 1, ..., turn k's tokens, so the answers the
target really produced are what the next turn carries (and what its prefix cache can hold).
Arrivals schedule sessions (their first turn); later turns follow the previous answer after the
session's think time.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Turn:
    """One request's new content: token ids appended after the session's history."""

    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    # Seconds from the run start at which a trace sent this turn. Set only by trace workloads:
    # their first turns replace the arrival process, and a later turn waits for its answer and
    # then for this time (whichever comes last).
    arrival_s: float | None = None


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    turns: tuple[Turn, ...]
    think_time_s: float = 0.0
    group: int | None = field(
        default=None, compare=False
    )  # e.g. the shared-prefix group, for reports and the ideal hit-rate ceiling


@dataclass(slots=True)
class RequestRecord:
    """What one request did, as `requests.jsonl` stores it (times in seconds from the run start).

    `token_times_s` are the arrival times of the streamed chunks that carried tokens, so
    TTFT = token_times_s[0] - start_s and ITL = successive differences (vLLM's definitions).
    """

    index: int
    session_id: str
    turn: int
    scheduled_s: float
    start_s: float
    end_s: float
    status: int  # HTTP status; 0 when the connection failed
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    token_times_s: list[float] = field(default_factory=list)
    error: str | None = None
    replica: str | None = None  # known in the simulator

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None
