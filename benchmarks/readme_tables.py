"""The README's result tables and the figures its prose quotes, generated from benchmarks/results/*.json.

    python benchmarks/readme_tables.py            # rewrite README.md's generated blocks and quoted figures
    python benchmarks/readme_tables.py --check    # exit 1, with a diff, where README.md and the results disagree

Every result table of README.md sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`
and is written by this command, from the JSON (never copied from a .md): the table, any note on what
is an estimate, and one line naming the results file(s), the commit and machine they come from and
the command that wrote them. Figures the README's prose quotes are listed in FIGURES: a phrase of
the README with `{}` where each figure stands, and how the figure follows from the results. A
rewrite puts the current figures in; a check fails when one differs, or when a phrase is no longer
found once in the README (then the prose changed: edit the phrase with it). The renderers and
phrases live in benchmarks/readme/, one module per README section, each with the BLOCKS and FIGURES
of its section (what they share is in benchmarks/readme/core.py); this file puts them together in
README order and is the command.
tests/benchmarks/test_readme_results.py runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.readme import data, kernels, main_job, model_library, parity, training  # noqa: E402
from benchmarks.readme.core import README, RESULTS, ROOT, Block, Figure, Results, source_line  # noqa: E402

__all__ = ["BLOCKS", "FIGURES", "README", "RESULTS", "ROOT", "Results", "check", "main", "render", "render_block"]

# The README's sections, in the order they stand in it.
SECTIONS = (main_job, kernels, parity, training, model_library, data)


def _blocks(sections: tuple[ModuleType, ...]) -> dict[str, Block]:
    """The sections' blocks in one dict; a block name two sections both define is an error."""
    blocks: dict[str, Block] = {}
    for section in sections:
        repeated = sorted(blocks.keys() & section.BLOCKS.keys())
        if repeated:
            raise ValueError(f"{section.__name__} defines blocks another section does too: {', '.join(repeated)}")
        blocks.update(section.BLOCKS)
    return blocks


BLOCKS = _blocks(SECTIONS)
FIGURES: list[Figure] = [figure for section in SECTIONS for figure in section.FIGURES]


def render_block(name: str, results: Results) -> str:
    block = BLOCKS[name]
    return f"{block.render(results).rstrip()}\n\n{source_line(results, block.sources)}\n"


# ----------------------------------------------------------------------------- the README


BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.DOTALL)


def render(text: str, results: Results | None = None) -> tuple[str, list[str]]:
    """README ``text`` with every generated block and quoted figure as the results give them, and the
    problems found (a block without its renderer or missing from the README, a phrase not found once)."""
    results = results or Results()
    problems = []
    seen = set()

    def block(match: re.Match) -> str:
        name = match["name"]
        seen.add(name)
        if name not in BLOCKS:
            problems.append(f"README block <!-- results:{name} --> has no renderer in benchmarks/readme/")
            return match[0]
        return match[1] + render_block(name, results) + match[4]

    text = BLOCK.sub(block, text)
    problems += [
        f"README has no block <!-- results:{name} --> ... <!-- /results:{name} -->"
        for name in BLOCKS
        if name not in seen
    ]
    for figure in FIGURES:
        pattern = figure.pattern()
        matches = list(pattern.finditer(text))
        if len(matches) != 1:
            problems.append(f"{len(matches)} places in README.md match the quoted phrase {figure.phrase!r} (need one)")
            continue
        match, values = matches[0], figure.expected(results)
        if len(values) != len(match.groups()):
            raise ValueError(f"{figure.phrase!r}: {len(values)} values for {len(match.groups())} places")
        for index in reversed(range(len(values))):  # from the end, so earlier offsets stay valid
            text = text[: match.start(index + 1)] + values[index] + text[match.end(index + 1) :]
    return text, problems


def check(readme: Path = README, results: Results | None = None) -> str:
    """'' when README.md agrees with the results; otherwise the problems and a unified diff."""
    old = readme.read_text()
    new, problems = render(old, results)
    diff = "".join(
        difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md", "README.md (from the results)")
    )
    return "\n".join(problems) + ("\n" if problems and diff else "") + diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if README.md is stale")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    if args.check:
        report = check(args.readme)
        if report:
            print(report, end="" if report.endswith("\n") else "\n")
            print(
                "README.md disagrees with benchmarks/results: run python benchmarks/readme_tables.py", file=sys.stderr
            )
            return 1
        return 0
    new, problems = render(args.readme.read_text())
    args.readme.write_text(new)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
