"""README.md stays true to the code: its config reference is the generated one."""

from __future__ import annotations

from pathlib import Path

from cluster.config_reference import END, START, render

README = Path(__file__).parents[2] / "README.md"


def test_config_reference_is_current() -> None:
    text = README.read_text()
    current = text[text.index(START) + len(START) : text.index(END)].strip()
    assert current == render(), "README.md is stale: paste `inference-cluster config reference`"


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test\n" in ci
    assert "make test " in README.read_text()


def test_loadtest_flags_are_current() -> None:
    from loadtest.cli import reference

    text = README.read_text()
    start, end = "<!-- loadtest-reference:start -->", "<!-- loadtest-reference:end -->"
    current = text[text.index(start) + len(start) : text.index(end)].strip()
    assert current == reference(), "README.md is stale: regenerate with loadtest.cli.reference()"


def test_config_reference_rows_keep_their_columns() -> None:
    """A pipe in a description is escaped: unescaped, it ended the cell (GitHub's tables split
    on it even inside backticks) and the command shown lost its pipe."""
    columns = {row.replace("\\|", "").count("|") for row in render().splitlines()}
    assert columns == {5}
    assert '`printf %s "$KEY" \\| sha256sum`' in render()
