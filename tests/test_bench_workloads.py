"""The workload harness (bench/workloads.py) keeps working: each workload's
smallest form runs for real (CLI processes, ``studio-agent run`` with its
signals and API), and what it reports has the shape of the table.  No timing
is asserted: the benchmark itself says what is fast enough."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import workloads
from ratio_table import Row, markdown_row

TINY = dataclasses.replace(
    workloads.QUICK,
    w2_files=2_000, w2_dirs=20, w2_whole_tree=True, w2d_interval=1.0,
    w3_files=1_000, w3_dirs=10, w3_edit_mb=2, w3_edit_files=20,
    w4_seconds=3.0, w4_change_minutes=(1, 2), w4_lead=0.2, w4_interval=1.0,
)  # fmt: skip


def test_w2_one_shot_and_daemon_report_every_step(tmp_path: Path) -> None:
    root = workloads.generated_root(tmp_path, TINY.w2_files, TINY.w2_dirs)
    assert sum(1 for p in (root / "data").rglob("*") if p.is_file()) == 2_000
    assert workloads.generated_root(tmp_path, TINY.w2_files, TINY.w2_dirs) == root  # kept

    rows, rss = workloads.w2_cli(TINY, 1, root, tmp_path, restic=False)
    assert [len(r.ours) for r in rows] == [1, 1, 1]
    assert all(r.met is None for r in rows[1:])  # no restic: n/a, not a pass
    assert set(rss) == {"baseline", "nothing changed", "1%", "whole tree", "restore"}
    assert all(v > 10 for v in rss.values())  # an interpreter's worth: really measured

    rows, daemon_rss = workloads.w2_daemon(TINY, 1, root, tmp_path)
    periodic, unchanged = rows
    assert len(periodic.ours) == len(unchanged.ours) == 1
    assert "changed" in periodic.note and not periodic.note.startswith("0 ")
    assert daemon_rss > 10

    w4_rows, w4_rss = workloads.w4(TINY, root, tmp_path, TINY.w2_dirs)
    cpu, peak, minutes = w4_rows
    assert cpu.ours[0] >= 0 and peak.ours == [w4_rss] and w4_rss > 10
    assert minutes.ours == [1.0], minutes.rounds_text  # both changes checkpointed


def test_w3_stops_with_its_final_checkpoint(tmp_path: Path) -> None:
    (row,) = workloads.w3(TINY, 1, tmp_path)
    assert len(row.ours) == 1
    assert row.require is not False, row.note  # exit code 0 and a final checkpoint


def test_table_rows_ratios_and_missing_values() -> None:
    row = Row("W9", "x", "s", [1.0, 3.0, 2.0], 0.5, reference=[4.0, 4.0, 4.0], ref_label="ref")
    assert row.values == [0.25, 0.75, 0.5]
    assert row.judged == 0.5 and row.met is True
    assert "0.25, 0.75, 0.50" in markdown_row(row)
    assert Row("W9", "x", "MB", [10, 300], 200.0, judge="max").met is False
    assert Row("W9", "x", "s", [0.1], 0.2, op="<", require=False).met is False
    missing = Row("W9", "x", "s", [], 1.2, reference=[], ref_label="ref")
    assert missing.met is None and markdown_row(missing).endswith("| n/a |")


def test_the_command_reports_s3_as_missing_without_its_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bench.s3_pipeline", None)  # as in a checkout without it
    out = tmp_path / "table.json"
    argv = ["--quick", "--only", "S3", "--scratch", str(tmp_path / "s"), "--json", str(out)]
    assert workloads.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick" and doc["machine"]
    (row,) = doc["rows"]
    assert row["workload"] == "S3" and row["met"] is None and row["values"] == []
