"""ember.cpu_threads: TVM's CPU pool gets one worker per physical core (TVM alone would take half of them on a
machine without SMT), and a user's own TVM_NUM_THREADS / OMP_NUM_THREADS wins."""

from __future__ import annotations

import os
import subprocess
import sys

from ember import cpu_threads


def _fake_sysfs(tmp_path, cores_of_cpu):
    for cpu, (pkg, core) in cores_of_cpu.items():
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{pkg}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return str(tmp_path)


def test_smt_siblings_count_once(tmp_path):
    # 4 logical CPUs, two per core (hyper-threading): 2 physical cores
    sysfs = _fake_sysfs(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    assert cpu_threads.physical_cores([0, 1, 2, 3], sysfs) == 2
    # one thread per core (a cloud VM): every CPU is a core
    sysfs2 = _fake_sysfs(tmp_path / "vm", {0: (0, 0), 1: (0, 1)})
    assert cpu_threads.physical_cores([0, 1], sysfs2) == 2
    # only the CPUs this process may use count
    assert cpu_threads.physical_cores([0, 2], sysfs) == 1


def test_no_topology_counts_every_cpu(tmp_path):
    assert cpu_threads.physical_cores([0, 1, 2], str(tmp_path / "missing")) == 3


def test_user_setting_wins():
    env = {"TVM_NUM_THREADS": "1"}
    assert cpu_threads.configure(env) is None and env == {"TVM_NUM_THREADS": "1"}
    env = {"OMP_NUM_THREADS": "3"}
    assert cpu_threads.configure(env) is None and "TVM_NUM_THREADS" not in env
    env = {}
    n = cpu_threads.configure(env)
    assert n == cpu_threads.physical_cores() and env["TVM_NUM_THREADS"] == str(n)


def test_import_ember_sizes_tvm_pool():
    """In a fresh process, after ``import ember`` TVM's pool has one worker per physical core."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    code = ("import ember, tvm; from ember import cpu_threads; "
            "print(tvm.get_global_func('runtime.NumThreads')(), cpu_threads.physical_cores())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    pool, cores = out.stdout.split()
    assert int(pool) == int(cores)
