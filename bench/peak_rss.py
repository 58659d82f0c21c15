"""Run the agent's CLI and report its own peak RSS (VmHWM) on stderr at exit.

    python bench/peak_rss.py [studio-agent arguments ...]

Measured inside the process: a child's ru_maxrss also counts the parent's pages
it shared between fork and exec (a large test runner, or moto hosted by the
benchmark), which would inflate it by hundreds of MB.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path


def report_peak() -> None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                print("VmHWM", int(line.split()[1]), file=sys.stderr)


def peak_kb(stderr: str) -> int | None:
    """The VmHWM this script printed, from a run's stderr."""
    values = [int(ln.split()[1]) for ln in stderr.splitlines() if ln.startswith("VmHWM ")]
    return values[-1] if values else None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from agent.cli import main

    atexit.register(report_peak)
    sys.exit(main(sys.argv[1:]))
