"""Multi-process training (``torchrun --nproc_per_node=N -m dynarch run ...``).

Every rank trains a DistributedDataParallel replica on its share of each batch. A mutation is
decided once, on rank 0, and broadcast; every rank applies the identical mutation (GradMax's
statistics are summed over all ranks' batches first, a pruning importance is computed on rank 0
and its channel indices broadcast); then DDP is re-wrapped around the changed model, which also
broadcasts rank 0's parameters and buffers. Only rank 0 writes the history and checkpoints.
Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) all of this is a single process
and nothing here runs.

When a process dies (killed, out of memory), the others notice in whichever collective comes
next (DDP's all-reduce, a broadcast, the barrier); that error becomes one :class:`PeerLost`
line on each of them, and the group is left before the interpreter shuts down.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dynarch.errors import DynarchError, first_line
from dynarch.launch import launched_ranks
from dynarch.stopping import RunInterrupted

# What gloo (a plain RuntimeError), NCCL and the store (DistError) say when a peer is gone:
# "[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:50381. This is..."
_PEER_GONE = ("by peer", "Broken pipe", "Connection refused", "Socket closed")


class PeerLost(DynarchError):
    """Another process of the run died, and this one cannot go on without it."""


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes, and the collectives it uses."""

    rank: int = 0
    world: int = 1
    run_dir: Path | None = None  # rank 0's, which every rank names when it fails

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all ranks (a new tensor on every rank)."""
        if self.world == 1:
            return tensor
        total = tensor.detach().clone()
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
        return total

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to train through: DDP around ``model`` (rank 0's state copied to every
        rank), or ``model`` itself in a single process. Call again after every mutation."""
        if self.world == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers everywhere. DDP sends them before every forward, and each rank's
        forward then moves its own BatchNorm statistics by its own share of the batch."""
        if self.world == 1:
            return
        for tensor in model.buffers():
            torch_dist.broadcast(tensor.data, src=0)

    def mismatched_parameters(self, model: nn.Module) -> list[str]:
        """Names of parameters that differ from rank 0's on any rank (the same list on all)."""
        if self.world == 1:
            return []
        bad = []
        for name, tensor in model.named_parameters():
            reference = tensor.detach().clone()
            torch_dist.broadcast(reference, src=0)
            differs = float(not torch.equal(reference, tensor.detach()))
            if self.sum(torch.tensor([differs], device=tensor.device)).item() > 0:
                bad.append(name)
        return bad


def start(device: torch.device, run_dir: Path) -> tuple[Processes, torch.device]:
    """Join the process group torchrun prepared (gloo on CPU, NCCL on CUDA); each CUDA rank
    takes its own GPU, and learns rank 0's run dir. Returns the single-process view when not
    launched by torchrun."""
    rank, world = launched_ranks()
    if world == 1:
        return Processes(run_dir=run_dir), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    with lost_peers_in_one_line(Processes(rank, world)):  # rank 0's dir: not known yet
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        run_dir = Processes(rank, world).broadcast(run_dir)
    return Processes(rank, world, run_dir), device


def stop(together: bool) -> None:
    """Leave the process group. After a completed run the ranks wait for each other first (a
    rank tearing gloo down while another still talks to it aborts); after an error they do
    not, since the others may never arrive (torchrun then stops them). The DDP wrappers are
    collected first: each holds the group, whose gloo threads would otherwise outlive
    ``destroy_process_group`` and be torn down with the interpreter (SIGABRT, "terminate
    called without an active exception")."""
    if torch_dist.is_initialized():
        if together:
            torch_dist.barrier()
        gc.collect()
        torch_dist.destroy_process_group()


def peer_lost(exc: BaseException, procs: Processes) -> PeerLost | None:
    """``exc`` as one line naming this rank, the lost peer and the cause, if it says that
    another process is gone; None for any other error."""
    text = str(exc)
    if procs.world == 1 or not isinstance(exc, RuntimeError):
        return None
    if not isinstance(exc, torch_dist.DistError) and not any(s in text for s in _PEER_GONE):
        return None
    said = re.search(r"Connection \w+ by peer", text)  # also as "Read error [addr]: ..."
    cause = said.group(0) if said else re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc))
    cause = cause.split(". ")[0].rstrip(".")
    peer = f"rank {1 - procs.rank}" if procs.world == 2 else "a peer"
    again = f"; resume with: dynarch run resume={procs.run_dir}" if procs.run_dir else ""
    return PeerLost(f"rank {procs.rank} lost {peer}: {cause or type(exc).__name__}{again}")


@contextmanager
def lost_peers_in_one_line(procs: Processes) -> Iterator[None]:
    """A peer's death, wherever this process notices it, as one :class:`PeerLost`; and under
    torchrun every rank's failure in rank 0's run.log (a rank's stderr may be lost with its
    job); the group is left if the run did not leave it (a failure before training)."""
    try:
        yield
    except BaseException as exc:
        lost = peer_lost(exc, procs)
        if procs.world > 1:
            _log_failure(procs, lost or exc)
            with suppress(RuntimeError):
                stop(together=False)
        if lost is not None:
            raise lost from None
        raise


def _log_failure(procs: Processes, exc: BaseException) -> None:
    """``rank N failed: LINE`` appended to rank 0's run.log, where it can be written."""
    if procs.run_dir is None or isinstance(exc, (RunInterrupted, SystemExit, KeyboardInterrupt)):
        return
    with suppress(OSError), open(procs.run_dir / "run.log", "a", encoding="utf-8") as log:
        log.write(f"rank {procs.rank} failed: {first_line(exc)}\n")
