"""Data-parallel training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

``torchrun --nproc_per_node=N -m red distill ...`` starts N processes; each reads RANK,
WORLD_SIZE and LOCAL_RANK from its environment and ``init_distributed`` joins the
process group (NCCL on CUDA, gloo on CPU). Without torchrun nothing here is used and a
single process trains exactly as before.

What is sharded: every ``StudentLayer`` is one FSDP2 unit holding the teacher's decoder
layer (frozen) and that layer's projections and gains; the root unit holds the teacher's
embedding, final norm, LM head and the student's embedding/head projections and final
norm. On CUDA parameters are all-gathered in bf16 and gradients reduced in fp32
(``MixedPrecisionPolicy``); on CPU everything stays fp32, so a 2-process gloo run
matches a single-process run to float32 rounding.

Start-up (``red.commands.distill.build_sharded_student``): the teacher and the student are built
on the ``meta`` device and wrapped into these units before any weight exists
(``wrap_student``); ``to_empty`` gives each rank storage for its shards only, and each rank
reads its rows of every teacher tensor from the safetensors (``shard_rows``,
``red.model.teacher.load_teacher_shards``), calibrates with one layer gathered at a time
(``red.train.calibration.calibrate_sharded``) and writes its rows of each projection
(``write_shard``). No rank holds the whole teacher (``red.train.startup.STARTUP_OBSERVERS`` can watch what it holds).

Batch semantics: ``batch_size`` is the *global* micro-batch. Every rank draws the same
global micro-batch from the same sampler and takes its contiguous slice of
``batch_size / world_size`` rows, so the global batch of an optimizer step is
``batch_size x grad_accum`` sequences whatever the number of processes, and a run (or a
checkpoint) means the same thing on 1 or N processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from datetime import timedelta

import torch
import torch.distributed as dist

from red.errors import RedError


@dataclass
class DistContext:
    """Who this process is. ``world_size == 1`` means a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: object = None  # a 1-D DeviceMesh over all ranks when distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a single process) ----------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``x`` over ranks (a new tensor; differentiability is not needed)."""
        if not self.distributed:
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y / self.world_size

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over ranks (a new tensor; ``x`` itself in one process)."""
        if not self.distributed:
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along dim 0, in rank order (equal shapes)."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def broadcast_error(self, message: str | None) -> str | None:
        """Rank 0's error message (or None) on every rank, sent as UTF-8 bytes (no pickle)."""
        if not self.distributed:
            return message
        dev = _collective_device()
        data = (message or "").encode()
        n = torch.tensor([len(data)], dtype=torch.long, device=dev)
        dist.broadcast(n, 0)
        buf = torch.zeros(int(n), dtype=torch.uint8, device=dev)
        if self.is_main and data:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if int(n):
            dist.broadcast(buf, 0)
        text = bytes(buf.cpu().tolist()).decode()
        return text or None

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global micro-batch."""
        if not self.distributed:
            return batch
        n = batch.shape[0] // self.world_size
        return batch[self.rank * n: (self.rank + 1) * n]


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (or return a
    single-process context). NCCL when this rank uses CUDA, gloo on CPU."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistContext()
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    mesh = init_device_mesh("cuda" if use_cuda else "cpu", (world,))
    return DistContext(rank=rank, world_size=world, local_rank=local, mesh=mesh)


def rank_device(ctx: DistContext, device: str) -> str:
    """The device this rank trains on: its own GPU under torchrun, else ``device``."""
    if ctx.distributed and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{ctx.local_rank}"
    if ctx.distributed and device.startswith("cuda:"):
        raise RedError(f"--device {device} names one GPU, but under torchrun each rank uses its LOCAL_RANK's GPU; "
                       "use --device auto or cuda")
    return device


def shard_student(student, ctx: DistContext, device: torch.device | None = None, shard_teacher: bool = True) -> None:
    """Shard ``student`` (and, with ``shard_teacher``, its frozen teacher) with FSDP2, one
    unit per decoder layer plus the root.

    ``device``: where the shards live; by default the student's device (give it when the
    student is still on the ``meta`` device: the sharded start-up shards first and
    materializes after, see ``red.commands.distill.build_sharded_student``)."""
    wrap_student(student, ctx, device, shard_teacher)


def wrap_student(student, ctx: DistContext, device: torch.device | None = None, shard_teacher: bool = True) -> None:
    """The FSDP2 units of a student: ``fully_shard`` on every StudentLayer (its projections
    and gains, and the teacher's decoder layer with ``shard_teacher``) and on the root (the
    student's embedding/head projections and final gain, and the teacher's embedding,
    final norm and LM head with ``shard_teacher``). Works on a student built on the
    ``meta`` device: its shards stay on ``meta`` until ``to_empty``.

    FSDP2 is the storage of the shards here, not the driver of the step: the student
    gathers what it needs itself, once per optimizer step for its weights and once per
    micro-batch for a sharded teacher's layers (``red.model.student``), so none of FSDP2's
    forward or backward hooks run."""
    from torch.distributed.fsdp import fully_shard

    if shard_teacher:
        student.register_teacher()
    for layer in student.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(student, mesh=ctx.mesh)


def shard_rows(t: torch.Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of dim 0 this rank holds of ``t``, a parameter FSDP2 has
    sharded (``Shard(0)``, ``torch.chunk`` sizes: ceil(rows / N) per rank, the last ones
    shorter or empty); ``(0, rows)`` for a plain tensor. Checked against the local shard."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return 0, t.shape[0] if t.dim() else 1
    if tuple(t.placements) != (Shard(0),):
        raise RuntimeError(f"expected a Shard(0) parameter, got placements {t.placements}")
    n, w, r = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-n // w)
    start = min(r * chunk, n)
    stop = min(start + chunk, n)
    if t.to_local().shape[0] != stop - start:
        raise RuntimeError(f"local shard has {t.to_local().shape[0]} rows, expected {stop - start} of {n}")
    return start, stop


@torch.no_grad()
def write_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's rows of ``full`` (the whole tensor, the same on every rank) into
    ``param``'s local shard (into ``param`` itself when it is not sharded). No communication."""
    start, stop = shard_rows(param)
    local = local_tensor(param)
    local.copy_(full[start:stop] if full.dim() else full)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) parameter or optimizer state.

    A collective for DTensors: every rank must call it in the same order.
    """
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


REPORTED_KEY = "red/rank0-reported"


def _default_store():
    """The process group's key-value store, or None without a process group."""
    try:
        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        pass
    return None


def mark_error_reported() -> None:
    """Rank 0, once it has printed a run's one error line: the other ranks may now leave."""
    store = _default_store()
    if store is not None:
        try:
            store.set(REPORTED_KEY, "1")
        except Exception:  # noqa: BLE001
            pass


def wait_for_error_report(timeout_s: float = 30.0) -> None:
    """A rank other than 0 that leaves on an error first lets torchrun stop rank 0 before it
    prints the run's one error line; so wait, at most ``timeout_s``, until rank 0 has."""
    store = _default_store()
    if store is None:
        import time

        time.sleep(min(timeout_s, 3.0))  # no group yet: rank 0 runs the same checks at the same time
        return
    try:
        store.wait([REPORTED_KEY], timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001
        pass
