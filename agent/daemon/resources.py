"""Resource figures for status and heartbeats: what the container may use, and uses.

Inside a container the host's totals mislead (a 64 GB host, a 8 GB limit), so
memory and CPU limits come from the container's cgroup (v2, else v1) when it
sets one.  Everything here reads /proc and /sys: call it off the event loop.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from agent.daemon.models import Resources

CGROUP = Path("/sys/fs/cgroup")
_V1_UNLIMITED = 1 << 60  # cgroup v1 spells "no limit" as a number near 2**63


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_memory(base: Path = CGROUP) -> tuple[int | None, int | None]:
    """(usage, limit) in bytes from the cgroup, each None when unknown or unlimited."""
    if (base / "memory.max").exists():  # v2
        limit_text = _read(base / "memory.max")
        limit = None if limit_text == "max" else _int(limit_text)
        return _int(_read(base / "memory.current")), limit
    v1 = base / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        limit = _int(_read(v1 / "memory.limit_in_bytes"))
        if limit is not None and limit >= _V1_UNLIMITED:
            limit = None
        return _int(_read(v1 / "memory.usage_in_bytes")), limit
    return None, None


def cgroup_cpu_limit(base: Path = CGROUP) -> float | None:
    """CPU cores the cgroup allows (quota / period), None when unlimited."""
    text = _read(base / "cpu.max")  # v2: "max 100000" or "200000 100000"
    if text is not None:
        quota, _, period = text.partition(" ")
        if quota == "max" or not period:
            return None
        q, p = _int(quota), _int(period)
        return q / p if q and p else None
    q = _int(_read(base / "cpu" / "cpu.cfs_quota_us"))  # v1: -1 when unlimited
    p = _int(_read(base / "cpu" / "cpu.cfs_period_us"))
    if q is None or p is None or q <= 0 or p <= 0:
        return None
    return q / p


def tree_rss(pid: int | None) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 when it is gone)."""
    if pid is None:
        return 0
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += int(p.memory_info().rss)
    return total


def read_resources(root: Path, ide_pid: int | None) -> Resources:
    vm = psutil.virtual_memory()
    used, limit = cgroup_memory()
    if used is None:
        used = int(vm.total - vm.available)
    try:
        disk = psutil.disk_usage(str(root))
        root_used, root_free = int(disk.used), int(disk.free)
    except OSError:
        root_used = root_free = 0
    return Resources(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        cpu_count=os.cpu_count() or 1,
        cpu_limit=cgroup_cpu_limit(),
        memory_used=used,
        memory_limit=limit,
        memory_total=int(vm.total),
        root_used=root_used,
        root_free=root_free,
        ide_rss=tree_rss(ide_pid),
    )
