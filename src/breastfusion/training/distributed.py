"""Training on several GPUs (or processes) with PyTorch's DistributedDataParallel (DDP).

Launch with torchrun, which starts one process per GPU and sets RANK, WORLD_SIZE and
LOCAL_RANK (plus the rendezvous address) in each one's environment:

* one node, N GPUs::

    torchrun --standalone --nproc_per_node N -m breastfusion experiment ...

* M nodes of N GPUs each (the same command on every node; HOST:PORT reachable from all)::

    torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT \\
        -m breastfusion experiment ...

`Distributed.from_env()` joins the process group torchrun describes (NCCL on CUDA GPUs,
one GPU per process: ``cuda:LOCAL_RANK``; gloo otherwise) and leaves it on exit; without
torchrun (WORLD_SIZE unset or 1) it is the single process and every collective is a no-op.
Only the main rank (`is_main`) writes files; the others wait at `barrier()`.

Distributed training keeps the single-process semantics, so a run gives the numbers of a
single-process run (up to float rounding: sums are taken in another order):

* Batches: every rank draws the single-process batches (same loader generator, same
  permutation; `GlobalBatchSampler` wraps the single-process batch sampler itself) and takes
  its contiguous slice of each. Slices differ by at most one sample when the batch size is not
  a multiple of the world size. A batch smaller than the world size (only the last batch of a
  loader that keeps it) leaves some ranks without a sample: such a rank gets one sample of the
  batch again, as padding with weight 0. Every rank therefore runs the same number of steps
  with a real forward/backward pass (DDP's gradient all-reduce needs each rank at each step),
  and padding changes neither loss nor gradient.
* Loss: the class-weighted mean over the global batch, sum_i w_i l_i / sum_i w_i. Each rank
  sums w_i l_i over its slice and divides by the all-reduced sum of w_i, times the world size
  because DDP averages the gradients of the ranks (see `loop.global_loss_of`).
* Model selection: the test split is predicted in shards, one per rank, and gathered on every
  rank in the single-process order, so every rank computes the same scores and picks the same
  best epoch; every rank returns the same best weights.
* Checkpoints: the main rank decides when one is due (one clock), writes it (with every rank's
  own RNG state) and alone reads it on resume, sending it to the others; no shared file
  system is needed for them.

Not the same as one process: trainable BatchNorm layers become SyncBatchNorm on GPUs (batch
statistics over the global batch, as one process computes them; a padding sample does enter
them); with gloo on CPUs (tests) BatchNorm statistics stay per rank (warned). Frozen BatchNorm
stays frozen. Dropout masks are drawn by each rank's own generator.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..inference.runtime import pick_device

log = logging.getLogger(__name__)


@dataclass
class Distributed:
    """This process's place among the training processes, and the collectives between them.

    `Distributed.single()` is the one-process case (every collective a no-op);
    `Distributed.from_env()` joins torchrun's process group and, used as a context manager,
    leaves it on exit. Constructed directly, it only describes a place (rank, world) and does
    no communication setup (enough to build the loaders of a rank)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = field(default=False, repr=False)  # this object initialised the process group

    @classmethod
    def single(cls, device: str | torch.device = "auto") -> Distributed:
        return cls(device=pick_device(device) if isinstance(device, str) else device)

    @classmethod
    def from_env(cls, device: str | torch.device = "auto",
                 timeout: datetime.timedelta | None = None) -> Distributed:
        """The place torchrun's environment gives this process (RANK, WORLD_SIZE, LOCAL_RANK).

        With WORLD_SIZE > 1 the default process group is initialised (unless it already is):
        NCCL when `device` is a CUDA device and CUDA is available, this process then pinned
        to ``cuda:LOCAL_RANK`` (whatever index `device` names); gloo otherwise."""
        dev = pick_device(device) if isinstance(device, str) else torch.device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=dev)
        if not tdist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world} but this PyTorch has no torch.distributed")
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "gloo"
        if dev.type == "cuda" and torch.cuda.is_available():
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
            if tdist.is_nccl_available():
                backend = "nccl"
        owns = not tdist.is_initialized()
        if owns:
            extra = {"timeout": timeout} if timeout is not None else {}
            tdist.init_process_group(backend, rank=rank, world_size=world, **extra)
        log.info("rank %d of %d (local %d) on %s, backend %s", rank, world, local_rank, dev,
                 tdist.get_backend())
        return cls(rank, world, local_rank, dev, owns)

    @property
    def enabled(self) -> bool:
        """More than one process: collectives communicate, DDP wraps the model."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """The rank that writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if not self.enabled:
            return
        if tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` (picklable; keep tensors in it on the CPU), on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` (on this rank's device) over the ranks, in place; returns it."""
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        """Leave the process group, if this object joined it."""
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
        self.owns_group = False

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- sharding

def bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items: shares differ by at most one,
    lower ranks take the extra items."""
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return start, start + q + (rank < r)


def is_padding(key: int) -> bool:
    return key < 0


def shard(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank's contiguous slice of a global batch (see `bounds`). A rank whose slice would be
    empty (the batch is smaller than the world) gets a padding entry instead: ``~i`` (negative)
    for the batch's sample i = batch[rank % len(batch)], served with weight 0 by `WeightedItems`."""
    start, stop = bounds(len(batch), rank, world)
    part = [int(i) for i in batch[start:stop]]
    return part or [~int(batch[rank % len(batch)])]


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's slice of each batch the single-process batch sampler draws.

    Every rank iterates `batches` itself: built on the same generator state, every rank draws
    the very batches one process would, and consumes its generator as one process would (so
    checkpointing the generator state stays exact)."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int):
        super().__init__()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in a world of {world}")
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield shard(batch, self.rank, self.world)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


class ShardSampler(Sampler[int]):
    """This rank's contiguous share of the order `base` gives (no padding: for prediction, where
    a rank may predict nothing). Concatenated in rank order, the shares are that order."""

    def __init__(self, base: Iterable[int], rank: int, world: int):
        super().__init__()
        self.base, self.rank, self.world = base, rank, world

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        start, stop = bounds(len(order), self.rank, self.world)
        return iter(order[start:stop])

    def __len__(self) -> int:
        start, stop = bounds(len(self.base), self.rank, self.world)  # type: ignore[arg-type]
        return stop - start


class WeightedItems(Dataset):
    """The items of `dataset`, each with a "sample_weight": 1, or 0 for a padding key ``~i``
    (see `shard`). Forwards `instances` and `set_epoch` to the dataset."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    @property
    def instances(self):
        return self.dataset.instances

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        pad = is_padding(key)
        item = dict(self.dataset[~key if pad else key])
        item["sample_weight"] = torch.tensor(0.0 if pad else 1.0)
        return item


def _same_loading(loader: DataLoader) -> dict[str, Any]:
    """A loader's worker, collate and memory options, to build another one like it."""
    return {"num_workers": loader.num_workers, "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory,
            "timeout": loader.timeout, "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context, "prefetch_factor": loader.prefetch_factor,
            "persistent_workers": loader.persistent_workers, "in_order": getattr(loader, "in_order", True)}


def distributed_loader(loader: DataLoader, dist: Distributed) -> DataLoader:
    """The training loader of `dist`'s rank: its slice of every batch `loader` would give (see
    `GlobalBatchSampler`), items carrying "sample_weight". Same dataset, generator (the one to
    checkpoint), workers and collate; `loader` itself is not to be iterated any more."""
    if loader.batch_sampler is None:
        raise ValueError("distributed training needs a loader that makes batches (batch_size set)")
    return DataLoader(WeightedItems(loader.dataset),
                      batch_sampler=GlobalBatchSampler(loader.batch_sampler, dist.rank, dist.world),
                      generator=loader.generator, **_same_loading(loader))


def distributed_eval_loader(loader: DataLoader, dist: Distributed) -> DataLoader:
    """The prediction loader of `dist`'s rank: its contiguous share of `loader`'s items, in
    batches of the same size. Gathered in rank order, the predictions are in `loader`'s order."""
    batch_size = loader.batch_size if loader.batch_size is not None else 1
    return DataLoader(loader.dataset, batch_size=batch_size,
                      sampler=ShardSampler(loader.sampler, dist.rank, dist.world), drop_last=False,
                      generator=loader.generator, **_same_loading(loader))


def is_sharded(loader: DataLoader) -> bool:
    """Whether `loader` already serves one rank's share (built by the functions above)."""
    return isinstance(loader.sampler, ShardSampler) or isinstance(loader.batch_sampler, GlobalBatchSampler)


# ---------------------------------------------------------------- the model

def _trainable_batchnorms(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, layer) of every BatchNorm layer that trains: frozen ones (parameters
    that require no gradient, kept in eval mode by their backbone) are left out."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                params = list(child.parameters())
                if not params or any(p.requires_grad for p in params):
                    found.append((parent, name, child))
    return found


@contextlib.contextmanager
def replicate(model: nn.Module, dist: Distributed) -> Iterator[nn.Module]:
    """Within: what to train, `model` in DistributedDataParallel when `dist` is enabled (else
    `model` itself). On a GPU its trainable BatchNorm layers are SyncBatchNorm meanwhile (they
    share parameters and statistics with the originals, which are back on exit).

    The wrapper's forward takes the model's arguments and returns its NetOutput. Parameters
    that require no gradient (frozen) are not synchronised; every trainable parameter must take
    part in each training forward pass (find_unused_parameters is off: it costs a graph walk
    per step), which holds for the networks here (ArcFace heads are used whenever a target
    is given; prediction runs the model itself, not the wrapper)."""
    if not dist.enabled:
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel

    trainable = _trainable_batchnorms(model)
    swapped = []
    if trainable and dist.device.type == "cuda":
        for parent, name, layer in trainable:
            setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(layer))
            swapped.append((parent, name, layer))
    elif trainable:
        log.warning("%d trainable BatchNorm layer(s): on %s their batch statistics are per rank, not over "
                    "the global batch (SyncBatchNorm needs GPUs)", len(trainable), dist.device)
    try:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        yield DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)
    finally:
        for parent, name, layer in swapped:
            setattr(parent, name, layer)
