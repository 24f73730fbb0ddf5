"""The benchmarks' readings of the machine and its processes, in one place: package versions,
the load average, CPU time, stolen time, resident memory (current and peak) and a server's
process tree, read through psutil or, where psutil has no such field, from ``/proc``.

Every benchmark takes these from here, so that a reading means the same in every record; the
readings are checked against the kernel's own fields (proc(5)) in
``tests/bench/test_proc_readings.py``.
"""

from __future__ import annotations

import importlib.metadata
import os
import resource
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


def package_version(*distributions: str) -> str | None:
    """The installed version of the first of ``distributions`` that is installed (read from
    its metadata, so that nothing is imported), or None."""
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    if not hasattr(os, "getloadavg"):
        return None
    return [round(x, 2) for x in os.getloadavg()]


def loadavg_text() -> str | None:
    """``/proc/loadavg`` as the kernel writes it (the load averages, then running/total
    tasks and the last pid), or None where there is no such file."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of ``pids`` (every thread of each, not their children's), in
    seconds; a process that has exited counts nothing."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += times.user + times.system
    return total


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to others, summed over this machine's CPUs (``steal``, Linux
    only): on a shared virtual machine, what makes one run slower than the next."""
    return getattr(psutil.cpu_times(), "steal", 0.0)


def rss(pid: int) -> int:
    """The resident set size of ``pid`` in bytes (``VmRSS``), 0 once it has exited."""
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def server_processes() -> dict[int, str | None]:
    """This process's server: ``{pid: model}`` of its descendants (tritonserver and the
    Python-backend stubs; ``None`` for processes that serve no one model)."""
    out = {}
    for process in psutil.Process().children(recursive=True):
        try:
            args = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        stub = args and args[0].endswith("triton_python_backend_stub") and len(args) > 1
        out[process.pid] = Path(args[1]).parent.parent.name if stub else None  # <model>/1/model.py
    return out


def _peak_since_reset() -> int | None:
    """The kernel's high-water mark of this process's RSS (``VmHWM`` in ``/proc/self/status``,
    bytes), if readable. psutil (7.2) reports the current RSS but not this peak, nor resets it
    (its issue #1540), so this one field is read here."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


class PeakRSS:
    """The process's peak RSS from a starting point: Linux resets the high-water mark when
    ``5`` is written to ``/proc/self/clear_refs``; elsewhere the lifetime peak (``ru_maxrss``)
    is all there is, and ``since_reset`` says which one was read."""

    def __init__(self) -> None:
        self.since_reset = False

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.since_reset = _peak_since_reset() is not None
        except OSError:
            self.since_reset = False

    def now(self) -> int:
        """The resident set size now, in bytes."""
        return psutil.Process().memory_info().rss

    def peak(self) -> int:
        """The peak resident set size since :meth:`reset` (or the process's lifetime), bytes."""
        if self.since_reset:
            return _peak_since_reset() or 0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class MemorySampler:
    """Peak RSS of a server (total, and per model) while a window runs; the process tree is
    read once, then only the RSS of its processes, so sampling costs the load next to nothing."""

    def __init__(self, processes: dict[int, str | None], period_s: float = 0.5):
        self.period_s, self.total, self.models = period_s, 0, {}
        self._processes = processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            sizes = {pid: rss(pid) for pid in self._processes}
            self.total = max(self.total, sum(sizes.values()))
            per_model: dict[str, int] = {}
            for pid, model in self._processes.items():
                if model is not None:
                    per_model[model] = per_model.get(model, 0) + sizes[pid]
            for m, value in per_model.items():
                self.models[m] = max(self.models.get(m, 0), value)
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class CpuClock:
    """The CPU time a server's processes and this process (the clients) spend between two
    moments (monotonic), and the time stolen from the machine, read by a thread of its own."""

    def __init__(self, pids: Sequence[int], start: float, end: float):
        self.server_s = self.client_s = self.stolen_s = 0.0
        self._pids = list(pids)
        self._marks = (start, end)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> tuple[float, float, float]:
        return cpu_seconds(self._pids), time.process_time(), stolen_seconds()

    def _run(self) -> None:
        readings = []
        for mark in self._marks:
            time.sleep(max(0.0, mark - time.monotonic()))
            readings.append(self._read())
        self.server_s, self.client_s, self.stolen_s = (b - a for a, b in zip(*readings))

    def __enter__(self) -> CpuClock:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join()
