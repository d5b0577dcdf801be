"""How many cores this process may use: the cgroup CPU limit where there is one (a container's or a Kubernetes
pod's `cpu` limit), then its CPU affinity (taskset, cpusets), then the machine's count.

A container limited to 2 CPUs on a 64-core host sees 64 cores in os.cpu_count() and usually in its affinity too;
sizing processes and threads from that oversubscribes the 2 CPUs it is throttled to. The limit is read from
cgroup v2's `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for none) along the process's cgroup path up to the root
(the smallest limit wins, as the kernel enforces every level), or from cgroup v1's `cpu.cfs_quota_us` /
`cpu.cfs_period_us`. A fractional limit is rounded up (1.5 CPUs: 2 cores), as Go and the JVM do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Cores:
    """The cores this process may use, and where the figure came from."""

    count: int
    limit: float | None  # CPUs allowed by the cgroup, None when unlimited or unknown
    affinity: int  # CPUs in the process's affinity mask

    def describe(self) -> str:
        limit = "none" if self.limit is None else f"{self.limit:g}"
        return f"{self.count} cores (cgroup CPU limit {limit}, CPU affinity {self.affinity})"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _smallest(limits: list[float | None]) -> float | None:
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _along(root: Path, cgroup_path: str) -> list[Path]:
    """The cgroup's folder under `root` and each parent up to `root` itself (those that exist)."""
    relative = Path(cgroup_path.strip().lstrip("/"))
    folders = [root / relative, *[root / parent for parent in relative.parents]]
    seen: list[Path] = []
    for folder in folders:
        if folder.is_dir() and folder not in seen:
            seen.append(folder)
    return seen or [root]


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs this process's cgroup may use (cgroup v2 cpu.max, else v1 CFS quota); None when unlimited."""
    lines = (_read(proc_self_cgroup) or "").splitlines()
    v2_path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if v2_path is not None or (root / "cpu.max").exists():
        limit = _smallest([_v2_limit(folder) for folder in _along(root, v2_path or "/")])
        if limit is not None:
            return limit
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "cpu" in parts[1].split(","):
            for mount in (root / parts[1], root / "cpu,cpuacct", root / "cpu"):
                if mount.is_dir():
                    return _smallest([_v1_limit(folder) for folder in _along(mount, parts[2])])
    return None


def affinity() -> int:
    """CPUs in this process's affinity mask (the machine's count where there is no such call)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_cores(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> Cores:
    """The cores to size processes and threads by: min(ceil(cgroup CPU limit), affinity), at least 1."""
    limit = cgroup_cpu_limit(root, proc_self_cgroup)
    mask = affinity()
    count = mask if limit is None else min(mask, max(1, math.ceil(limit - 1e-9)))
    return Cores(count=max(1, count), limit=limit, affinity=mask)
