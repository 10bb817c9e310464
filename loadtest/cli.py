"""`loadtest` (also `python -m loadtest`): run, simulate, compare, capacity."""

from __future__ import annotations

import argparse
import os
import sys

from cluster.cli import EXIT_INTERRUPTED
from loadtest import capacity, compare, run, simulate


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="loadtest",
        description="Load generator, cluster simulator and comparisons for OpenAI-compatible "
        "LLM endpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (run, simulate, compare, capacity):
        module.register(commands)
    return parser, dict(commands.choices)


def reference() -> str:
    """Every subcommand's --help, as README.md shows it (a unit test keeps the copy current)."""
    # argparse wraps to the terminal's width (COLUMNS); the README needs one fixed width.
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        _, subcommands = build_parser()
        helps = [sub.format_help().rstrip() for sub in subcommands.values()]
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return "\n\n".join(f"```text\n{text}\n```" for text in helps)


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:  # Ctrl-C where no partial result is kept (`run`'s load keeps one)
        print(f"loadtest {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
