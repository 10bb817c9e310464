"""The comparison table: each figure per target and its ratio to the first target."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loadtest import run
from loadtest.cli import main
from loadtest.compare import render_table


def test_ratios_to_the_first_target() -> None:
    base = {"completed": 10, "ttft_ms": {"p50": 100.0, "p90": 200.0}, "output_throughput": 50.0}
    other = {"completed": 10, "ttft_ms": {"p50": 25.0, "p90": None}, "output_throughput": 100.0}
    table = render_table(["ours", "anchor"], ["http://a", "http://b"], [base, other])
    lines = table.splitlines()
    assert lines[0] == "| figure | ours | anchor |"
    assert "| TTFT p50 (ms) | 100 | 25 (0.25x) |" in lines
    assert "| TTFT p90 (ms) | 200 | n/a |" in lines
    assert "| output tokens/s | 50 | 100 (2.00x) |" in lines
    # Figures no target has (simulator-only ones here) are left out, not shown as n/a.
    assert not any(line.startswith("| engine cache hit rate") for line in lines)


def test_ctrl_c_during_a_target_stops_the_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target's run interrupted: no more targets run and no comparison is written (a cut run
    was compared with whole ones, `completed 6 | 20 (3.33x)`)."""
    started: list[str] = []

    def interrupted(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
        started.append(args.base_url)
        raise KeyboardInterrupt  # Ctrl-C outside the load itself

    monkeypatch.setattr(run, "handle", interrupted)
    (tmp_path / "compare.md").write_text("an earlier comparison\n")  # must not pass for this one
    argv = ["compare", "--target", "http://a", "--target", "http://b", "--out", str(tmp_path)]
    assert main([*argv, "--", "--workload", "random"]) == 130
    assert started == ["http://a"] and not (tmp_path / "compare.md").exists()
    out = capsys.readouterr()
    assert "loadtest run: interrupted" in out.err
    assert "compare: interrupted during target-0; no comparison written" in out.out
