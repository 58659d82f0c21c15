"""The targets table: one row per target, our value against its reference or bound.

A row holds what was measured, round by round: our values and, for a target
stated as a ratio, the reference's from the same rounds (each round's two
sides ran back to back, so the ratio is taken per round).  Whether a target
is met is judged on the median of the rounds for times (one slow round on a
shared machine should not decide it), on the largest value for memory and
for yes/no checks (every process, every minute must pass).  A row with
nothing measured (a workload not run, a field the agent does not report yet,
a module not there) shows "n/a".
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Judge = Literal["median", "max", "min"]
Op = Literal["<", "<=", ">="]


@dataclass
class Row:
    workload: str
    what: str
    unit: str  # of our values: "s", "MB", "%", "" (a plain number)
    ours: list[float]
    bound: float | None
    op: Op = "<="
    reference: list[float] | None = None  # a ratio target: the reference's values per round
    ref_label: str = ""
    judge: Judge = "median"
    rounds_text: list[str] | None = None  # how to show each round, when not as a number
    note: str = ""
    require: bool | None = None  # a condition besides the bound (False: not met whatever the value)

    @property
    def values(self) -> list[float]:
        """Per round: the ratio for a ratio target, else our value."""
        if self.reference is None:
            return list(self.ours)
        if not self.reference or len(self.reference) != len(self.ours):
            return []
        return [o / r for o, r in zip(self.ours, self.reference, strict=True)]

    @property
    def judged(self) -> float | None:
        v = self.values
        if not v:
            return None
        if self.judge == "max":
            return max(v)
        if self.judge == "min":
            return min(v)
        return statistics.median(v)

    @property
    def met(self) -> bool | None:
        j = self.judged
        if j is None or self.bound is None:
            return None
        if self.op == "<":
            ok = j < self.bound
        elif self.op == "<=":
            ok = j <= self.bound
        else:
            ok = j >= self.bound
        return ok and self.require is not False

    def to_json(self) -> dict[str, Any]:
        v = self.values
        doc = asdict(self)
        doc |= {
            "values": v,
            "min": min(v) if v else None,
            "median": statistics.median(v) if v else None,
            "max": max(v) if v else None,
            "judged": self.judged,
            "met": self.met,
        }
        return doc


def _num(x: float) -> str:
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _with_unit(x: float, unit: str) -> str:
    return f"{_num(x)} {unit}".strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# "ours" is the judged statistic of our values (the median, or the largest for
# memory); "reference" the median of the reference's.
HEADER = (
    "| workload | what | ours | reference | each round | min / median / max | target | met |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def markdown_row(row: Row) -> str:
    v = row.values
    ratio = row.reference is not None
    pick = {"median": statistics.median, "max": max, "min": min}[row.judge]
    ours = _with_unit(pick(row.ours), row.unit) if row.ours else "n/a"
    if ratio:
        ref = row.reference or []
        shown = _with_unit(statistics.median(ref), row.unit) if ref else "n/a"
        ref_cell = f"{row.ref_label} {shown}".strip()
    else:
        ref_cell = "—"
    if row.rounds_text is not None:
        rounds = ", ".join(row.rounds_text) or "n/a"
    else:
        rounds = ", ".join(_num(x) for x in v) or "n/a"
    spread = f"{_num(min(v))} / {_num(statistics.median(v))} / {_num(max(v))}" if v else "n/a"
    unit = "" if ratio else row.unit
    if row.bound is None:
        target = "—"
    else:
        op = {"<": "<", "<=": "≤", ">=": "≥"}[row.op]
        target = ("ratio " if ratio else "") + f"{op} {row.bound:g} {unit}".rstrip()
        if row.judge != "median":
            target += f" ({row.judge})"
    met = {True: "yes", False: "**no**", None: "n/a"}[row.met]
    what = row.what + (f" ({row.note})" if row.note else "")
    cells = [row.workload, what, ours, ref_cell, rounds, spread, target, met]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def markdown(rows: list[Row]) -> str:
    return "\n".join([HEADER, *(markdown_row(r) for r in rows)])


@dataclass
class Report:
    machine: str
    mode: str
    rounds: int
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0  # the whole run
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [
            f"Machine: {self.machine}",
            f"Mode: {self.mode}, {self.rounds} round(s); the whole run took {self.seconds:.0f} s.",
            "",
            markdown(self.rows),
        ]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        doc = {
            "machine": self.machine,
            "mode": self.mode,
            "rounds": self.rounds,
            "seconds": self.seconds,
            "notes": self.notes,
            "rows": [r.to_json() for r in self.rows],
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
