"""What every README section's results share: where the README and the results are, the results
loader and its record helpers, the number formats, the source line naming where a table's figures come
from, and the Block and Figure a section lists its tables and quoted figures as.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"


class Results:
    """The results files of one directory, read once each: ``results["attention"]`` is attention.json."""

    def __init__(self, directory: Path = RESULTS):
        self.directory = directory
        self._loaded: dict[str, dict] = {}

    def __getitem__(self, name: str) -> dict:
        if name not in self._loaded:
            self._loaded[name] = json.loads((self.directory / f"{name}.json").read_text())
        return self._loaded[name]


def first_record(r: Results, name: str, **match) -> dict:
    """The first record of results file ``name`` whose fields equal ``match``."""
    return next(x for x in r[name]["records"] if all(x.get(k) == v for k, v in match.items()))


def summary_value(r: Results, name: str, key: str) -> float:
    return r[name]["summary"][key]


# ----------------------------------------------------------------------------- formats


def duration(value: float) -> str:
    """Three significant figures in seconds, whole milliseconds below 1 s, two figures below 10 ms."""
    if value >= 1:
        return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f} s"
    milliseconds = value * 1e3
    if milliseconds >= 10:
        return f"{milliseconds:.0f} ms"
    return f"{milliseconds:.{max(0, 1 - math.floor(math.log10(milliseconds)))}f} ms"


def memory(value: float) -> str:
    """MiB below 1 GiB, GiB to one decimal above."""
    return common.mebibytes(value) if value < 2**30 else f"{value / 2**30:.1f} GiB"


def thousands(value: float) -> str:
    return f"{value:,.0f}"


def kilo(value: float, decimals: int = 1) -> str:
    return f"{value / 1e3:.{decimals}f}k"


def percent(value: float, decimals: int = 0) -> str:
    return f"{value * 100:.{decimals}f}%"


def signed_percent(value: float, decimals: int = 1) -> str:
    return f"{value * 100:+.{decimals}f}%"


def ratio(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def three_figures(value: float) -> str:
    """1,730 / 70.3 / 7.26: three significant figures, thousands separated."""
    digits = math.floor(math.log10(abs(value)))
    rounded = round(value, 2 - digits)
    return f"{rounded:,.{max(0, 2 - digits)}f}"


def jump(value: float) -> str:
    """A loss jump in nats: two decimals, three below 0.05."""
    return f"{value:+.{2 if abs(value) >= 0.05 else 3}f}"


def spread(values: list[str], joiner: str = "-") -> str:
    """One figure where all agree, else "first-last" (``values`` formatted, lowest first)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else f"{distinct[0]}{joiner}{distinct[-1]}"


# ----------------------------------------------------------------------------- provenance


def short(commit: str) -> str:
    return commit[:7]


def where(machine: dict) -> str:
    """The machine in words: "2-core x86_64 CPU, torch 2.13.0+cpu", "NVIDIA H200 (16-core x86_64 host), torch ..."."""
    cores = machine.get("cpu_count", machine.get("cpus"))
    cpu = machine.get("cpu_model") or machine.get("cpu")
    if "gpu" in machine:
        host = f"{cores}-core {cpu} host" if cpu else f"{cores}-core host"
        text = f"{machine['gpu']} ({host})"
    elif cores:
        text = f"{cores}-core {cpu} CPU" if cpu else f"{cores}-core CPU"
    else:
        return "machine not recorded"
    return f"{text}, torch {machine['torch']}" if "torch" in machine else text


def provenance(name: str, results: dict) -> str:
    """One results file's clause of a block's source line."""
    machine = results["machine"]
    if machine.get("commit"):
        tree = {True: "tree dirty", False: "tree clean"}.get(machine.get("dirty"), "tree state not recorded")
        commit = f"commit {short(machine['commit'])} ({tree})"
    else:
        commit = f"commit not recorded (results committed in {machine['committed_in']})"
    edits = machine.get("edited_by_hand") or []
    for edit in edits if isinstance(edits, list) else [edits]:  # one edit, or a list in order
        commit += (
            f", edited by hand in {edit['commit']} ({edit['summary']}; "
            f"{'figures edited' if edit['figures_edited'] else 'no figure edited'})"
        )
    text = f"`benchmarks/results/{name}.json`, {commit}, {where(machine)}: `{machine['command']}`"
    if machine.get("command_recorded") is False:
        text += " (command not recorded: read off the file's settings)"
    if machine.get("run_by"):
        text += f", run by `{machine['run_by']}`"
    if results.get("settings", {}).get("complete") is False:
        text += " (stopped before its last run: the table shows the runs it finished)"
    return text


def source_line(results: Results, names: tuple[str, ...]) -> str:
    return "From " + "; ".join(provenance(name, results[name]) for name in names) + "."


# ----------------------------------------------------------------------------- blocks and figures


@dataclass(frozen=True)
class Block:
    sources: tuple[str, ...]
    render: Callable[[Results], str]


@dataclass(frozen=True)
class Figure:
    """A phrase of the README with ``{}`` for each figure, and the figures as the results give them."""

    phrase: str
    values: Callable[[Results], str | tuple[str, ...]]

    def pattern(self) -> re.Pattern:
        """The phrase as a regular expression: its spaces match any whitespace (the README wraps lines),
        each ``{}`` one figure (no whitespace in it)."""
        literal = [re.sub(r"(\\ |\s)+", r"\\s+", re.escape(part)) for part in self.phrase.split("{}")]
        return re.compile(r"(\S+)".join(literal))

    def expected(self, results: Results) -> tuple[str, ...]:
        values = self.values(results)
        return (values,) if isinstance(values, str) else tuple(values)


def low_high(values: list[float], digits: int) -> tuple[str, str]:
    """The lowest and the highest of ``values``, to ``digits`` decimals."""
    return f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"


def both(function: Callable[[str], float], keys: tuple[str, ...], digits: int) -> tuple[str, str]:
    """The lowest and the highest of ``function`` over ``keys``, to ``digits`` decimals."""
    return low_high([function(key) for key in keys], digits)
