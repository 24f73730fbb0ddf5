"""The benchmarks' readings of the machine and its processes, in one place: package versions,
the load average, CPU time (a process's; the machine's busy and stolen time), resident memory
(current and peak) and a server's process tree, read through psutil or, where psutil has no
such field, from ``/proc``; and the samplers that read them while a load runs.

Every benchmark takes these from here, so that a reading means the same in every record; the
readings are checked against the kernel's own fields (proc(5)) in
``tests/bench/test_proc_readings.py``.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import resource
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

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


def machine_busy_seconds() -> float:
    """CPU time this machine's CPUs spent busy, summed over them: every process's, other users'
    too (all but idle and waiting for I/O)."""
    # the busy fields summed (not the total less idle): the same fields in the same order, so a
    # later reading is never below an earlier one by a rounding error of the subtraction
    idle = ("idle", "iowait")
    return sum(v for name, v in psutil.cpu_times()._asdict().items() if name not in idle)


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


_S = TypeVar("_S", bound="_Sampler")


class _Sampler:
    """A reading every ``period_s`` by a thread of its own, the first on entering the ``with``
    block, until it is left; a subclass says what one reading is (:meth:`sample`)."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Take one reading."""
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.period_s):
                return

    def __enter__(self: _S) -> _S:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class MemorySampler(_Sampler):
    """Peak RSS of a server (total, and per model) while a window runs; the process tree is
    read once, then only the RSS of its processes, so sampling costs the load next to nothing."""

    def __init__(self, processes: dict[int, str | None], period_s: float = 0.5):
        super().__init__(period_s)
        self.total, self.models = 0, {}
        self._processes = processes

    def sample(self) -> None:
        """The RSS of each process now; the peaks so far."""
        sizes = {pid: rss(pid) for pid in self._processes}
        self.total = max(self.total, sum(sizes.values()))
        per_model: dict[str, int] = {}
        for pid, model in self._processes.items():
            if model is not None:
                per_model[model] = per_model.get(model, 0) + sizes[pid]
        for m, value in per_model.items():
            self.models[m] = max(self.models.get(m, 0), value)


class ServerCpuSampler(_Sampler):
    """CPU time of each of this process's server's processes (:func:`server_processes`, read
    again at every sample: those that start during the load count too) and of the whole machine
    (:func:`machine_busy_seconds`), every ``period_s``: the cores each kept busy between two
    moments, and what a process born in between spent."""

    def __init__(self, period_s: float = 0.25):
        super().__init__(period_s)
        self.samples: list[tuple[float, dict[int, float], float]] = []  # (t, {pid: s}, machine)
        self.models: dict[int, str | None] = {}  # pid -> its model (None: tritonserver)
        self.born: dict[int, float] = {}  # pid -> when it was first seen

    def sample(self) -> None:
        """The server's processes now (a new one is born now), the CPU of each, the machine's."""
        now = time.monotonic()
        for pid, model in server_processes().items():
            self.models.setdefault(pid, model)
            self.born.setdefault(pid, now if self.samples else -math.inf)  # there before
        busy = machine_busy_seconds()
        self.samples.append((now, {p: cpu_seconds([p]) for p in self.models}, busy))

    def cores(self, start: float, end: float) -> tuple[float | None, float | None]:
        """Cores the server and the machine kept busy from ``start`` to ``end`` (monotonic),
        from the first and the last sample inside; (None, None) without two there."""
        inside = [x for x in self.samples if start <= x[0] <= end]
        if len(inside) < 2:
            return None, None
        (t0, first, busy0), (t1, last, busy1) = inside[0], inside[-1]
        server = sum(max(0.0, v - first.get(p, 0.0)) for p, v in last.items())
        return server / (t1 - t0), (busy1 - busy0) / (t1 - t0)

    def new_process_cpu(self, start: float, end: float, model: str) -> float | None:
        """CPU seconds, by ``end``, of ``model``'s processes born from ``start`` to ``end``
        (None without a sample by then)."""
        born = [p for p, t in self.born.items() if start <= t <= end and self.models[p]]
        inside = [x for x in self.samples if x[0] <= end]
        if not inside:
            return None
        return sum(inside[-1][1].get(p, 0.0) for p in born if self.models[p] == model)


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
