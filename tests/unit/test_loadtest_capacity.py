"""`loadtest capacity`: the bisection, the SLO check, and the command on a simulated target."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from loadtest.capacity import narrow_rate, sustained
from loadtest.cli import main
from loadtest.spec import RequestRecord

SIMULATED_CONFIG = Path(__file__).parents[2] / "cluster" / "configs" / "simulated.yaml"


def record(start_s: float, ttft_s: float | None) -> RequestRecord:
    """A request started at start_s that got its first token after ttft_s (None: it failed)."""
    if ttft_s is None:
        return RequestRecord(0, "s", 0, start_s, start_s, start_s + 1, status=503, error="x")
    first = start_s + ttft_s
    return RequestRecord(0, "s", 0, start_s, start_s, first + 1, 200, token_times_s=[first])


@pytest.mark.parametrize("per_step", [1, 4])
def test_narrowing_brackets_the_threshold(per_step: int) -> None:
    threshold = 13.37
    tried: list[float] = []

    def probe(rates: list[float]) -> list[bool]:
        assert len(rates) == per_step
        tried.extend(rates)
        return [rate <= threshold for rate in rates]

    low, high = narrow_rate(probe, 1.0, 64.0, 0.25, per_step=per_step)
    assert low <= threshold < high and high - low <= 0.25
    # Only rates strictly inside the first bracket: the bounds are given, not probed.
    assert all(1.0 < r < 64.0 for r in tried)


def test_a_bracket_already_narrow_probes_nothing() -> None:
    def probe(rates: list[float]) -> list[bool]:
        raise AssertionError("probed")

    assert narrow_rate(probe, 10.0, 10.2, 0.25) == (10.0, 10.2)


def test_sustained_needs_every_window_within_the_slo() -> None:
    fast = [record(t, 0.1) for t in range(20)]
    assert sustained(fast, 20.0, 10.0, 0.5)
    # One slow request in twenty is past the window's p95 (nearest rank: the 10th of 10).
    assert not sustained([*fast, record(15.5, 0.9)], 20.0, 10.0, 0.5)
    # A failure is an infinite TTFT.
    assert not sustained([*fast[:10], record(12.0, None), *fast[12:]], 20.0, 10.0, 0.5)
    # A window without requests is not a failure; a run without any is not a success.
    assert sustained(fast[:10], 20.0, 10.0, 0.5)
    assert not sustained([], 20.0, 10.0, 0.5)
    # Requests after the hold are not judged.
    assert sustained([*fast, record(25.0, 9.0)], 20.0, 10.0, 0.5)


def capacity(tmp_path: Path, *flags: str, run: tuple[str, ...] = ()) -> tuple[int, dict]:
    out = tmp_path / "cap"
    code = main(["capacity", "--out", str(out), *flags, "--", *run])
    result = out / "capacity.json"
    return code, json.loads(result.read_text()) if result.exists() else {}


# Long prompts and few output tokens: a replica's capacity is low (~7 req/s), so that each probe
# simulates a few hundred requests.
PREFILL_HEAVY = ("--workload", "random", "--input-len", "4096", "--output-len", "8")


def test_the_search_on_a_simulated_target(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, result = capacity(
        tmp_path,
        f"--target=sim:{SIMULATED_CONFIG}",
        "--replicas=2",
        "--hold-s=20",
        "--window-s=5",
        "--low=1",
        "--high=32",
        "--resolution=3",
        "--utilization=0.9",
        run=PREFILL_HEAVY,
    )
    assert code == 0
    probes = result["probes"]
    assert probes[0]["rate"] == 1 and probes[0]["sustained"]
    passed = [p["rate"] for p in probes if p["sustained"]]
    failed = [p["rate"] for p in probes if not p["sustained"]]
    # Two 8B/H100 replicas sustain ~14.6 req/s of these: the search has to find a rate both
    # sides of it.
    assert failed and not result["capacity_at_least"]
    assert result["capacity_per_s"] == max(passed) < min(failed) <= max(passed) + 3
    assert 8 <= result["capacity_per_s"] <= 28
    assert result["capacity_per_replica_per_s"] == result["capacity_per_s"] / 2
    assert result["target_rate_per_replica"] == pytest.approx(result["capacity_per_s"] / 2 * 0.9)
    for number, probe in enumerate(probes):
        folder = tmp_path / "cap" / f"rate-{probe['rate']:g}"
        assert (folder / "summary.json").is_file() and (folder / "run.log").is_file()
        summary = json.loads((folder / "summary.json").read_text())
        assert probe["requests"] == summary["num_requests"]
        # Each probe draws its own prompts: on a real target, repeated ones would be cached.
        assert probe["seed"] == number and f"seed {number}" in summary["workload"]
    printed = capsys.readouterr().out
    assert f"target_rate_per_replica: {result['target_rate_per_replica']:.4g}" in printed
    assert "| metric | value |" not in printed  # each run's own table went to its run.log


def test_a_target_that_sustains_nothing_exits_1(tmp_path: Path) -> None:
    code, result = capacity(
        tmp_path,
        f"--target=sim:{SIMULATED_CONFIG}",
        "--slo-ttft-ms=1",
        "--hold-s=5",
        "--low=2",
        run=PREFILL_HEAVY,
    )
    assert code == 1
    assert result["capacity_per_s"] is None and len(result["probes"]) == 1


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (("--rate", "3"), "--rate is set by capacity"),
        (("--num-requests=10",), "--num-requests is set by capacity"),
        (("--seed", "3"), "--seed is set by capacity"),
        (("--workload", "multi-turn"), "workload multi-turn is not one request per arrival"),
        (("--workload=trace:x.jsonl",), "not one request per arrival"),
    ],
)
def test_flags_capacity_sets_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, run: tuple[str, ...], message: str
) -> None:
    code, result = capacity(tmp_path, f"--target=sim:{SIMULATED_CONFIG}", run=run)
    assert code == 2 and not result
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--low=8", "--high=8"), "--low must be below --high"),
        (("--utilization=1.5",), "--utilization is a share of the capacity"),
    ],
)
def test_search_bounds_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: tuple[str, ...], message: str
) -> None:
    code, _ = capacity(tmp_path, "--target=http://127.0.0.1:9", *flags)
    assert code == 2 and message in capsys.readouterr().err


def test_an_unreachable_target_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, result = capacity(tmp_path, "--target=http://127.0.0.1:9", "--hold-s=1")
    assert code == 2 and not result
    assert "wrote no requests (exit 2)" in capsys.readouterr().err


def test_ctrl_c_during_a_probe_ends_the_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A probe's `loadtest run` interrupted (exit 130, a partial report) is no probe: the search
    stops there, says which probes ended, and exits 130 (it read the partial run's exit code as
    "wrote no requests", exit 2)."""
    import loadtest.cli

    runs: list[list[str]] = []

    def interrupted_run(argv: list[str]) -> int:
        runs.append(argv)
        return 130

    monkeypatch.setattr(loadtest.cli, "main", interrupted_run)
    stale = tmp_path / "cap" / "capacity.json"  # an earlier search's result in the same OUT
    stale.parent.mkdir()
    stale.write_text(json.dumps({"capacity_per_s": 2.5}))
    code, result = capacity(tmp_path, "--target=http://127.0.0.1:9", "--hold-s=1")
    assert code == 130 and len(runs) == 1
    assert result["interrupted"] and result["capacity_per_s"] is None and result["probes"] == []
    assert "loadtest capacity: interrupted; probes done: none" in capsys.readouterr().out


def test_a_probe_stopped_at_an_slo_miss_is_not_sustained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A URL's probes run with --stop-at-slo-miss at the search's window; one that stopped is
    not sustained, also when the stop cut every request (it read as "wrote no requests")."""
    import loadtest.cli

    runs: list[list[str]] = []

    def run(argv: list[str]) -> int:
        runs.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        stopped = "--rate" in argv and float(argv[argv.index("--rate") + 1]) > 2.0
        summary = {"slo_missed_window_s": 2.0} if stopped else {}
        (out / "summary.json").write_text(json.dumps(summary))
        # Stopped, every request in flight was cut: nothing ended, exit 1.
        fast = [] if stopped else [record(0.5 * i, 0.1) for i in range(8)]
        (out / "requests.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in fast))
        return 1 if stopped else 0

    monkeypatch.setattr(loadtest.cli, "main", run)
    flags = ("--target=http://127.0.0.1:9", "--hold-s=4", "--window-s=2", "--low=1", "--high=4")
    code, result = capacity(tmp_path, *flags, "--resolution=1.5")
    assert code == 0
    assert all(argv[argv.index("--stop-at-slo-miss") + 1] == "2" for argv in runs)
    # Only the windows of the hold count, as in this command's own verdict.
    assert all(argv[argv.index("--stop-at-slo-miss-until-s") + 1] == "4" for argv in runs)
    assert [(p["rate"], p["sustained"]) for p in result["probes"]] == [(1.0, True), (2.5, False)]
    assert result["probes"][1]["stopped_at_window_s"] == 2.0
    assert "not sustained (stopped: the window from 2 s missed)" in capsys.readouterr().out
