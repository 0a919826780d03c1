"""README.md's result tables and the figures its prose quotes agree with benchmarks/results/*.json.

benchmarks/readme_tables.py renders every block between `<!-- results:NAME -->` markers from the
JSON and holds every listed figure of the prose to it; here it runs in check mode, in-process (a
second or two, no benchmark is run). When this fails after new results: `python
benchmarks/readme_tables.py` rewrites the README, then read the diff.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import readme_tables  # noqa: E402


def test_readme_agrees_with_the_results_files():
    report = readme_tables.check()
    assert not report, (
        f"README.md disagrees with benchmarks/results (run python benchmarks/readme_tables.py):\n{report}"
    )


def test_a_hand_edited_table_cell_or_quoted_figure_is_caught():
    text = readme_tables.README.read_text()
    first_row = re.search(r"^\| 10 \| [0-9.]+ \|", text, re.MULTILINE)[0]  # the main job's step-10 train loss
    for old, new in ((first_row, "| 10 | 99.99 |"), ("is **70x** faster", "is **71x** faster")):
        assert text.count(old) == 1, old
        rendered, problems = readme_tables.render(text.replace(old, new))
        assert rendered == text and not problems, f"{old!r} -> {new!r} was not put right"


def test_new_results_change_the_readme(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(readme_tables.RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.log"))
    main_job = json.loads((results / "main_job.json").read_text())
    main_job["metrics"]["train_loss"]["10"] = 9.125
    main_job["metrics"]["tokens_per_s_median"] = 18_100.0
    (results / "main_job.json").write_text(json.dumps(main_job))
    rendered, problems = readme_tables.render(readme_tables.README.read_text(), readme_tables.Results(results))
    assert not problems
    assert "| 10 | 9.12 |" in rendered and "Throughput: 18.1k tokens/s" in rendered


def test_a_failed_gpu_step_shows_its_error_in_the_table(tmp_path):
    """A GPU run that ran out of memory at one length still renders, with the error in its cell."""
    results = tmp_path / "results"
    shutil.copytree(readme_tables.RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.log"))
    model_step = json.loads((results / "model_step-gpu.json").read_text())
    failed = next(r for r in model_step["records"] if r["model"] == "ours" and r["length"] == 16384)
    model_step["records"][model_step["records"].index(failed)] = {
        "model": "ours",
        "length": 16384,
        "error": "out of GPU memory",
    }
    (results / "model_step-gpu.json").write_text(json.dumps(model_step))
    rendered = readme_tables.render_block("model_step-gpu", readme_tables.Results(results))
    assert "| ours (FAVOR+) | 67,742 (1.2%) | out of GPU memory |" in rendered


def test_a_phrase_the_readme_no_longer_has_is_reported():
    text = readme_tables.README.read_text().replace("Throughput: ", "Speed: ", 1)
    _, problems = readme_tables.render(text)
    assert any("Throughput: {} tokens/s" in problem for problem in problems), problems


def test_every_results_file_records_where_it_comes_from():
    for path in sorted(readme_tables.RESULTS.glob("*.json")):
        machine = json.loads(path.read_text())["machine"]
        assert {"commit", "dirty", "command"} <= machine.keys(), path.name
        assert machine["command"].split()[0] in ("python", "python3"), path.name
        if machine["commit"] is None:  # recorded before commits were: the commit that committed the figures
            assert re.fullmatch(r"[0-9a-f]{7,40}", machine["committed_in"]), path.name
        else:
            assert re.fullmatch(r"[0-9a-f]{7,40}", machine["commit"]) and isinstance(machine["dirty"], bool), path.name


def test_every_results_file_the_readme_shows_is_named_in_a_source_line():
    text = readme_tables.README.read_text()
    for block in readme_tables.BLOCKS.values():
        for name in block.sources:
            assert f"From `benchmarks/results/{name}.json`" in text or f"; `benchmarks/results/{name}.json`" in text, (
                name
            )
