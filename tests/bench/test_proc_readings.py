"""The benchmarks' CPU-time, memory and process-tree readings (psutil) against the kernel's own
fields, read from /proc as proc(5) defines them (the hand-written readers they replaced, kept
here as the reference), on a live process tree."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgery_edge.bench import proc

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc only")
TICK = 1 / os.sysconf("SC_CLK_TCK")  # the resolution of the kernel's CPU times


def _stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (``state`` first: field N of proc(5) at
    N - 3); the name is cut at its last ``)``, as it may hold spaces."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_seconds_ref(pids) -> float:
    return sum(int(_stat(p)[11]) + int(_stat(p)[12]) for p in pids) * TICK  # utime + stime


def _vm_rss_ref(pid) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _descendants_ref(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_stat(int(entry))[1])
            except OSError:
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _steal_ref() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) * TICK


# A child that spends CPU, holds 40 MB, starts a "stub" grandchild named as Triton's Python
# backend names its stubs (<model>/1/model.py), says so, then idles (its readings stand still).
CHILD = """
import subprocess, sys, time
held = bytearray(40 * 2**20)
for i in range(0, len(held), 4096):
    held[i] = 1
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
stub = subprocess.Popen([sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE)
stub.stdout.readline()  # the stub is up, and idles from here
print("ready", stub.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def tree(tmp_path):
    model = tmp_path / "my-model" / "1" / "model.py"
    model.parent.mkdir(parents=True)
    model.write_text("import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    stub = tmp_path / "triton_python_backend_stub"
    stub.symlink_to(sys.executable)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(stub), str(model)], stdout=subprocess.PIPE, text=True
    )
    try:
        word, grandchild = child.stdout.readline().split()
        assert word == "ready"
        yield child.pid, int(grandchild)
    finally:
        for pid in _descendants_ref(child.pid):
            os.kill(pid, 9)
        child.kill()
        child.wait()


def test_the_readings_agree_with_the_kernels_fields(tree):
    child, stub = tree
    found = proc.server_processes()
    assert set(found) == _descendants_ref(os.getpid()) and {child, stub} <= set(found)
    assert found[stub] == "my-model" and found[child] is None
    # CPU time: user + system of every thread, the same clock ticks (the tree is idle)
    cpu = proc.cpu_seconds([child, stub])
    assert cpu >= 0.3 - TICK
    assert cpu == pytest.approx(_cpu_seconds_ref([child, stub]), abs=2 * TICK)
    # RSS: VmRSS of each process, the 40 MB the child holds included
    assert proc.rss(child) > 40 * 2**20
    assert proc.rss(child) == pytest.approx(_vm_rss_ref(child), rel=0.01)
    assert proc.PeakRSS().now() == pytest.approx(_vm_rss_ref(os.getpid()), abs=4 * 2**20)
    # the machine's stolen time, read between two readings of /proc/stat
    before = _steal_ref()
    stolen = proc.stolen_seconds()
    assert before - TICK <= stolen <= _steal_ref() + TICK


def test_the_cpu_sampler_reads_the_server_tree_and_the_machine(tree):
    child, stub = tree
    with proc.ServerCpuSampler(period_s=0.05) as cpu:
        time.sleep(0.2)
    assert {child: None, stub: "my-model"}.items() <= cpu.models.items()
    assert cpu.born[child] == cpu.born[stub] == -math.inf  # there before the first sample
    (t0, first, busy0), (t1, last, busy1) = cpu.samples[0], cpu.samples[-1]
    assert len(cpu.samples) >= 3 and t1 > t0 and busy1 >= busy0
    # each process's CPU time as the kernel counts it, standing still (the tree is idle)
    assert last[child] == pytest.approx(_cpu_seconds_ref([child]), abs=2 * TICK)
    assert first[child] == pytest.approx(last[child], abs=2 * TICK)
    assert last[stub] == pytest.approx(_cpu_seconds_ref([stub]), abs=2 * TICK)
    server, machine = cpu.cores(t0, t1)
    assert 0 <= server <= machine + 0.1 and machine <= os.cpu_count() + 0.1


def test_the_machines_busy_time_stands_still_while_only_idle_time_grows(monkeypatch):
    import collections

    fields = "user nice system idle iowait irq softirq steal"
    Times = collections.namedtuple("Times", fields)
    # a reading whose total less idle came out one rounding step lower after idle grew
    before = Times(11613.37, 4.22, 2423.0, 11862.89, 4.38, 0.0, 49.58, 0.0)
    after = before._replace(idle=11862.94)
    readings = iter([before, after])
    monkeypatch.setattr(proc.psutil, "cpu_times", lambda: next(readings))
    assert proc.machine_busy_seconds() == proc.machine_busy_seconds() == pytest.approx(14090.17)


def test_a_process_that_has_exited_reads_as_nothing():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = int(done.stdout)
    assert proc.rss(gone) == 0 and proc.cpu_seconds([gone]) == 0.0
