"""Where a benchmark's results go in the README: between the markers of its own section, written by the run itself
(`make bench` passes --update README.md to every benchmarks/bench_*.py), so no speed figure in the README is typed
by hand. Not a benchmark itself (`make bench` runs bench_*.py only)."""
from __future__ import annotations

import argparse
from pathlib import Path

from kvlib.engine.io import replace_marked_block


def markers(bench: str) -> tuple[str, str]:
    return (f"<!-- {bench}:start (make bench, or python benchmarks/{bench}.py --update README.md) -->",
            f"<!-- {bench}:end -->")


def check(parser: argparse.ArgumentParser, readme: str | None, bench: str) -> None:
    """Refuse before measuring (minutes) when the README lacks the section's markers."""
    if readme is None:
        return
    start, end = markers(bench)
    path = Path(readme)
    if not path.is_file():
        parser.error(f"--update {readme}: file not found")
    text = path.read_text(encoding="utf-8")
    if start not in text or end not in text:
        parser.error(f"{readme}: add the lines `{start}` and `{end}` where {bench}'s results belong")


def add_update_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--update", metavar="README", help="also write the results into this file's section")


def write(readme: str | None, bench: str, body: str) -> None:
    """Replace the section's text with `body` (Markdown), when --update named a README."""
    if readme is None:
        return
    start, end = markers(bench)
    replace_marked_block(readme, start, end, body if body.endswith("\n") else body + "\n")
    print(f"wrote the results into {readme} ({bench} section)")


def text_block(lines: list[str]) -> str:
    """Lines printed by a benchmark as a fenced block (fixed-width columns stay aligned)."""
    return "```text\n" + "\n".join(lines) + "\n```\n"
