"""Cores from the cgroup CPU limit, then affinity (core.cpus), and the worker's sizing from them: fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core import cpus
from core.settings import Settings
from worker import context


def _tree(tmp_path: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc_file = tmp_path / "proc-self-cgroup"
    proc_file.write_text(proc)
    return root, proc_file


def test_cgroup_v2_quota_in_a_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "affinity", lambda: 64)
    root, proc = _tree(tmp_path, {"cpu.max": "200000 100000\n"}, "0::/\n")
    assert cpus.cgroup_cpu_limit(root, proc) == 2.0
    assert cpus.available_cores(root, proc) == cpus.Cores(count=2, limit=2.0, affinity=64)


def test_fractional_limits_round_up_and_never_below_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "affinity", lambda: 64)
    root, proc = _tree(tmp_path, {"cpu.max": "150000 100000"}, "0::/\n")
    assert cpus.available_cores(root, proc).count == 2
    (root / "cpu.max").write_text("25000 100000")
    assert cpus.available_cores(root, proc) == cpus.Cores(count=1, limit=0.25, affinity=64)


def test_no_limit_means_the_affinity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "affinity", lambda: 3)
    root, proc = _tree(tmp_path, {"cpu.max": "max 100000"}, "0::/\n")
    assert cpus.cgroup_cpu_limit(root, proc) is None
    assert cpus.available_cores(root, proc).count == 3
    # A limit above the affinity: the affinity is the smaller.
    (root / "cpu.max").write_text("800000 100000")
    assert cpus.available_cores(root, proc) == cpus.Cores(count=3, limit=8.0, affinity=3)


def test_the_smallest_limit_along_the_cgroup_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "affinity", lambda: 16)
    root, proc = _tree(
        tmp_path,
        {
            "cpu.max": "max 100000",
            "kubepods.slice/cpu.max": "400000 100000",
            "kubepods.slice/pod1/cpu.max": "300000 100000",
            "kubepods.slice/pod1/ctr/cpu.max": "max 100000",
        },
        "0::/kubepods.slice/pod1/ctr\n",
    )
    assert cpus.cgroup_cpu_limit(root, proc) == 3.0
    assert cpus.available_cores(root, proc).count == 3


def test_cgroup_v1_cfs_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "affinity", lambda: 8)
    root, proc = _tree(
        tmp_path,
        {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
        "4:memory:/x\n2:cpu,cpuacct:/\n0::/\n",
    )
    assert cpus.cgroup_cpu_limit(root, proc) == 1.5
    assert cpus.available_cores(root, proc).count == 2
    (root / "cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_cpu_limit(root, proc) is None


def test_unreadable_or_missing_files_mean_no_limit(tmp_path: Path) -> None:
    root, proc = _tree(tmp_path, {"cpu.max": "garbage"}, "")
    assert cpus.cgroup_cpu_limit(root, proc) is None
    assert cpus.cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-proc") is None
    assert cpus.available_cores(tmp_path / "absent", tmp_path / "absent-proc").count == cpus.affinity()


def test_this_machine_never_reports_more_cores_than_its_affinity() -> None:
    found = cpus.available_cores()
    assert 1 <= found.count <= len(os.sched_getaffinity(0))


def test_worker_threads_follow_the_container_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "affinity", lambda: 64)
    root, proc = _tree(tmp_path, {"cpu.max": "400000 100000"}, "0::/\n")
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_SELF_CGROUP", proc)
    monkeypatch.setattr(cpus.available_cores, "__defaults__", (root, proc))
    assert context.available_cores() == 4
    two_processes = Settings(worker_concurrency=2)
    assert context.tf_threads_for(two_processes) == 2
    assert context.io_threads_for(two_processes) == 4
    assert context.tf_threads_for(Settings(worker_concurrency=8)) == 1
    # ALLSCORE_TF_THREADS and ALLSCORE_IO_THREADS win over the sizing.
    assert context.tf_threads_for(Settings(worker_concurrency=2, tf_threads=3)) == 3
    assert context.io_threads_for(Settings(io_threads=7)) == 7


def test_tf_threads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLSCORE_TF_THREADS", "5")
    assert Settings().tf_threads == 5
    assert context.tf_threads_for(Settings()) == 5
