"""Memory does not grow with the number of files: the peak RSS of a baseline, of a
checkpoint with nothing changed, of one after 1% of the files changed, of one
where every file is new and of its restore into an empty root is the same at
100,000 files as at 10,000 (the parent state streams beside the walk, and what
is written is counted, not remembered)."""

from __future__ import annotations

import os
from pathlib import Path

from test_memory import peak_rss_mb

# Ten times the files, as many per directory: what may grow is what must be
# remembered (the change list), not the tree.
BOUND_MB = 20
PER_DIR = 100


def _tree(root: Path, files: int) -> list[Path]:
    out = []
    for d in range(files // PER_DIR):
        path = root / f"g{d // 30:03}" / f"d{d:04}"
        path.mkdir(parents=True)
        for i in range(PER_DIR):
            f = path / f"f{i:03}"
            os.close(os.open(f, os.O_WRONLY | os.O_CREAT, 0o644))
            out.append(f)
    return out


def _change_one_percent(files: list[Path]) -> None:
    """Rewrite 1% of the files, delete a tenth of those, add as many."""
    changed = files[:: len(files) // (len(files) // 100)]
    for f in changed:
        f.write_bytes(b"changed\n")
    for f in changed[::10]:
        f.unlink()
        f.with_name(f.name + ".new").write_bytes(b"new\n")


def _peaks(tmp: Path, files: int) -> dict[str, float]:
    root, state, work = tmp / "root", tmp / "state", str(tmp / "work")
    names = _tree(root, files)

    def run(*args: str) -> float:
        return peak_rss_mb(
            ["--root", str(root), "--workdir", work, "--studio", "m",
             "--state-dir", str(state), *args]
        )  # fmt: skip

    peaks = {"baseline": run("baseline"), "unchanged": run("checkpoint", "--name", "same")}
    _change_one_percent(names)
    peaks["one percent"] = run("checkpoint", "--name", "changed")

    # Every file new: a session begun on an empty root, the tree moved into it.
    fresh, target = tmp / "fresh", tmp / "target"
    fresh.mkdir()
    target.mkdir()

    def run_on(where: Path, state_dir: str, *args: str) -> float:
        return peak_rss_mb(
            ["--root", str(where), "--workdir", work, "--studio", "m",
             "--state-dir", str(tmp / state_dir), *args]
        )  # fmt: skip

    run_on(fresh, "fresh-state", "baseline")
    for top in root.iterdir():
        top.rename(fresh / top.name)
    peaks["all new"] = run_on(fresh, "fresh-state", "checkpoint", "--name", "all-new")
    peaks["restore"] = run_on(target, "target-state", "restore", "--checkpoint", "all-new")
    assert len(list(target.glob("g*/d*/f*"))) == len(list(fresh.glob("g*/d*/f*")))
    return peaks


def test_peak_rss_does_not_grow_with_the_file_count(tmp_path: Path) -> None:
    small = _peaks(tmp_path / "small", 10_000)
    large = _peaks(tmp_path / "large", 100_000)
    assert set(large) == {"baseline", "unchanged", "one percent", "all new", "restore"}
    for step, peak in large.items():
        grew = peak - small[step]
        assert grew < BOUND_MB, (
            f"{step}: {small[step]:.0f} MB at 10,000 files, {peak:.0f} at 100,000"
        )
