"""`loadtest` (also `python -m loadtest`): run, simulate, compare."""

from __future__ import annotations

import argparse
import sys

from loadtest import compare, run, simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loadtest",
        description="Load generator, cluster simulator and comparisons for OpenAI-compatible "
        "LLM endpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (run, simulate, compare):
        module.register(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
