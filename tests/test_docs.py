"""The README stays true: its settings table is the settings model's."""

from __future__ import annotations

import re
from pathlib import Path

from agent.settings import markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_settings_table_matches_the_model() -> None:
    text = README.read_text()
    m = re.search(r"<!-- settings-table -->\n(.*?)<!-- /settings-table -->", text, re.S)
    assert m, "README lost its settings-table markers"
    assert m.group(1) == markdown_table(), (
        "README settings table is stale: regenerate it with `python -m agent.settings`"
    )


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (README.parent / ".ci/run").read_text()
    assert ".venv/bin/python -m pytest" in README.read_text()
    assert "\n.venv/bin/python -m pytest\n" in ci


def test_benchmark_commands_named_in_the_docs_exist() -> None:
    docs = README.read_text() + (README.parent / "docs/benchmarks.md").read_text()
    named = set(re.findall(r"\bbench/[\w.]+\.py\b", docs))
    assert "bench/checkpoint_bench.py" in named
    assert "bench/tarformat_bench.py" in named
    missing = sorted(p for p in named if not (README.parent / p).is_file())
    assert not missing, f"docs name benchmark scripts that do not exist: {missing}"
