"""Data-parallel work across the processes of a torchrun job: torch.distributed, gloo or nccl.

A process started by ``torchrun`` (or by ``surgery-edge train --nproc N``, which launches the
same thing) finds its place in the job in the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`joined` turns that into
a :class:`World`: the process group (gloo on the CPU, nccl on GPUs, one GPU per local rank) and
the few operations the trainers need. A process started any other way is the one-process world
:data:`World.single`, on which every operation is a no-op, so the same code runs both ways.

The rules every distributed stage keeps:

- **One writer.** Rank 0 writes every file (caches, checkpoints, adapters, merged models); the
  others read, compute their share and send it to the writer.
- **Same answer.** Work is split into units that are computed exactly as one process computes
  them (same shapes, same order of operations), so a cache assembled from shards is the file
  one process writes, bit for bit.
- **Stop together.** A rank that loses a peer (killed, crashed) raises :class:`DistributedError`
  at its next exchange instead of waiting forever, and writes nothing partial.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from surgery_edge.errors import ConfigError, WorkerError

U = TypeVar("U")
_HEADER = 16  # int64 slots describing one unit's arrays: count, then (ndim, *shape) per array
TIMEOUT = datetime.timedelta(minutes=30)  # a peer that hangs (not one that dies) is waited for


class DistributedError(WorkerError):
    """A rank of a distributed job stopped (killed, crashed, unreachable): the job stops too.

    Not the user's input, so not exit code 2 but 3 (``WorkerError``): the command may simply be
    run again.
    """


def launched() -> bool:
    """True in a process that torchrun started as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a job, and the exchanges between them.

    Attributes:
        rank: 0 .. size-1; rank 0 is the only writer.
        size: how many processes the job has.
        local_rank: the rank on this machine (selects the GPU).
        device: where this rank computes (``cuda:<local_rank>`` under nccl).
        backend: ``gloo`` | ``nccl``; None for one process.
    """

    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str | None = None

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> World:
        """The one-process world: no process group, every exchange a no-op."""
        return cls(0, 1, 0, torch.device(device))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if not self.distributed:
            return "one process"
        return f"{self.size} processes ({self.backend}), rank {self.rank}"

    # --- splitting work -----------------------------------------------------------------------

    def share(self, n: int, rank: int | None = None) -> range:
        """This rank's contiguous share of ``range(n)`` (shares differ in size by at most 1)."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (1 if rank < extra else 0))

    def require_rows(self, rows: int, what: str) -> None:
        """ConfigError unless every rank gets at least one of ``rows`` rows per step."""
        check_rows(rows, self.size, what)

    # --- collectives --------------------------------------------------------------------------

    def barrier(self, what: str) -> None:
        if self.distributed:
            with self.lost(what):
                dist.barrier()

    def broadcast(self, value: Any, what: str) -> Any:
        """The writer's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_writer else None]
        with self.lost(what):
            dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def mean(self, value: torch.Tensor, what: str) -> torch.Tensor:
        """The mean of a scalar over the ranks (every rank gets it)."""
        if not self.distributed:
            return value
        total = value.detach().to(self._comm_device, torch.float64).reshape(1).clone()
        with self.lost(what):
            dist.all_reduce(total)
        return (total / self.size).to(value.device, value.dtype).reshape(value.shape)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel (its gradients averaged over the ranks at
        every backward pass); the module itself for one process."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel  # deferred: only jobs need it

        ids = [self.device.index] if self.device.type == "cuda" else None
        with self.lost("starting DistributedDataParallel"):
            return DistributedDataParallel(module, device_ids=ids)

    def exchange(
        self,
        units: Sequence[U],
        compute: Callable[[U], Sequence[torch.Tensor]],
        deliver: Callable[[U, list[np.ndarray]], None],
        everyone: bool = False,
        what: str = "exchanging results",
    ) -> None:
        """Compute ``units`` across the ranks and deliver each unit's float32 arrays, in order.

        Rank r computes the units of :meth:`share` ``(len(units), r)``, its j-th one at step j,
        so the ranks compute at the same time; then the step's results travel to the writer
        (``everyone=False``: only the writer's ``deliver`` is called) or to every rank. Units are
        delivered in ``units`` order on each receiving rank.
        """
        if not self.distributed:
            for unit in units:
                deliver(unit, [t.detach().cpu().numpy() for t in compute(unit)])
            return
        shares = [self.share(len(units), r) for r in range(self.size)]
        for j in range(max(len(s) for s in shares)):
            mine = None
            if j < len(shares[self.rank]):
                mine = [
                    t.detach().float().contiguous() for t in compute(units[shares[self.rank][j]])
                ]
            for r, share in enumerate(shares):
                if j >= len(share):
                    continue
                unit = units[share[j]]
                if everyone:
                    deliver(unit, self._broadcast_arrays(mine if r == self.rank else None, r, what))
                elif r == self.rank and self.is_writer:
                    deliver(unit, [t.cpu().numpy() for t in mine])
                elif r == self.rank:
                    self._send(mine, what)
                elif self.is_writer:
                    deliver(unit, self._recv(r, what))

    # --- point to point -----------------------------------------------------------------------

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _header(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        fields = [len(tensors)]
        for t in tensors:
            fields += [t.ndim, *t.shape]
        if len(fields) > _HEADER:
            raise ValueError(f"too many dimensions to exchange: {fields}")
        return torch.tensor(fields + [0] * (_HEADER - len(fields)), dtype=torch.int64)

    def _buffers(self, header: torch.Tensor) -> list[torch.Tensor]:
        fields, out, at = header.tolist(), [], 1
        for _ in range(fields[0]):
            ndim = fields[at]
            shape = fields[at + 1 : at + 1 + ndim]
            out.append(torch.empty(shape, dtype=torch.float32, device=self._comm_device))
            at += 1 + ndim
        return out

    def _send(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        with self.lost(what):
            dist.send(self._header(tensors).to(self._comm_device), dst=0)
            for t in tensors:
                dist.send(t.to(self._comm_device), dst=0)

    def _recv(self, src: int, what: str) -> list[np.ndarray]:
        header = torch.empty(_HEADER, dtype=torch.int64, device=self._comm_device)
        with self.lost(what):
            dist.recv(header, src=src)
            buffers = self._buffers(header.cpu())
            for b in buffers:
                dist.recv(b, src=src)
        return [b.cpu().numpy() for b in buffers]

    def _broadcast_arrays(
        self, tensors: Sequence[torch.Tensor] | None, src: int, what: str
    ) -> list[np.ndarray]:
        with self.lost(what):
            if tensors is not None:
                header = self._header(tensors).to(self._comm_device)
            else:
                header = torch.empty(_HEADER, dtype=torch.int64, device=self._comm_device)
            dist.broadcast(header, src=src)
            buffers = (
                [t.to(self._comm_device) for t in tensors]
                if tensors is not None
                else self._buffers(header.cpu())
            )
            for b in buffers:
                dist.broadcast(b, src=src)
        return [b.cpu().numpy() for b in buffers]

    @contextlib.contextmanager
    def lost(self, what: str) -> Iterator[None]:
        """A failed exchange (a peer gone) as a DistributedError that says what was happening
        (one process: the block as it is)."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except RuntimeError as e:  # gloo/nccl report a vanished peer as RuntimeError subclasses
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"Rank {self.rank} of {self.size} lost contact with another rank while {what} "
                f"({first}). The job stops: another process was killed or crashed (its own "
                "message says why). Nothing partial was written: finished artefacts and the last "
                "training checkpoint are intact, so the same command (with --resume for train) "
                "continues from there."
            ) from None


def check_rows(rows: int, processes: int, what: str) -> None:
    """ConfigError unless each of ``processes`` gets at least one of ``rows`` rows per step
    (checked before a launcher starts them, and by each of them)."""
    if rows < processes:
        raise ConfigError(
            f"{what} is {rows}, smaller than the {processes} processes of this job: every "
            f"process needs at least one image per step. Use --batch-size {processes} or "
            f"more, or fewer processes."
        )


def check_gpus(device: torch.device, processes: int) -> None:
    """ConfigError when ``processes`` ranks on this machine would share fewer CUDA GPUs."""
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise ConfigError(
            f"{processes} processes on this machine need one GPU each, and it has "
            f"{torch.cuda.device_count()}. Start at most that many processes per node "
            "(--nproc / --nproc-per-node), or use --device cpu."
        )


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[World]:
    """This process's :class:`World` for the block: a rank of the torchrun job that started it,
    or :meth:`World.single` when none did.

    Args:
        device: the device the run asks for; under a job, ``cuda`` becomes this rank's GPU
            (``cuda:<LOCAL_RANK>``, nccl) and the CPU uses gloo.
    """
    if not launched():
        yield World.single(device)
        return
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":  # the same answer on every rank, so rank 0 can say it
        check_gpus(device, max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), local_rank + 1))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    world = World(rank, size, local_rank, device, backend)
    with world.lost("joining the job (rendezvous)"):
        dist.init_process_group(
            backend, timeout=TIMEOUT, device_id=device if backend == "nccl" else None
        )
    try:
        yield world
    finally:
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()
