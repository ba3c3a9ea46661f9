"""Several processes on torch.distributed (``torchrun --nproc-per-node N -m analysis <command> ...``): joining
the process group, rank 0's messages, gathering, and batches dealt out over the ranks.

Used by the sharded collection (:mod:`analysis.engine.sharded`) and the sharded generation of an
evaluation (:mod:`analysis.safety.evaluate`). Backend: gloo on the CPU, nccl on GPUs (rank r uses
``cuda:<LOCAL_RANK>``). Only rank 0 speaks (:func:`leader_process`) and writes results; a failed rank ends
the run, since torchrun stops every rank when one exits with an error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from analysis.core.config import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Ranks", "leader_process", "map_batches", "start"]


def leader_process() -> bool:
    """Whether this process speaks: a single process, or rank 0 under torchrun (``RANK``)."""
    return os.environ.get("RANK", "0") == "0"


@dataclasses.dataclass
class Ranks:
    """This process's place in the process group: ``rank``, ``world`` size; ``created``: this module
    initialised the group (and destroys it in :meth:`close`)."""

    rank: int
    world: int
    created: bool = False

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, message: Any) -> None:
        """Rank 0: broadcast ``message`` (any picklable object) to every rank."""
        import torch.distributed as dist

        dist.broadcast_object_list([message], src=0)

    def receive(self) -> Any:
        """Other ranks: the next message rank 0 broadcast."""
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (rank order), None elsewhere."""
        import torch.distributed as dist

        out = [None] * self.world if self.leader else None
        dist.gather_object(value, out, dst=0)
        return out

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` on every rank (rank order)."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def start(device: torch.device, device_map: str | None = None) -> tuple[Ranks | None, torch.device]:
    """Join the process group when this process is one of several (torchrun's ``WORLD_SIZE`` > 1, or a group
    already initialised); returns (None, device) for a single process. On GPUs rank r uses
    ``cuda:<LOCAL_RANK>`` (the returned device). ``device_map`` (the model's ``ModelConfig.device_map``):
    several ranks refuse it (ConfigError), since accelerate would spread every rank's model over all GPUs."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        ranks = Ranks(dist.get_rank(), dist.get_world_size())
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device_map is not None:
            raise ConfigError(f"device_map {device_map!r} spreads one model over all GPUs; under torchrun every "
                              "rank has its own model on its own GPU: drop --device-map or run one process")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), created=True)
    else:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", ranks.rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return ranks, device


def map_batches(ranks: Ranks | None, items: Sequence[Any], batch_size: int,
                work: Callable[[list[Any]], list[Any]]) -> list[Any]:
    """``work`` over ``items`` in batches of ``batch_size``, the batches dealt over the ranks (batch j to rank
    j % world); every rank gets all outputs in the order of ``items`` (``all_gather``). A rank hands ``work``
    its batches concatenated, so ``work`` that batches by ``batch_size`` itself sees the very batches one
    process would (same padding, same numbers). One process (``ranks`` None): ``work(items)``."""
    items = list(items)
    if ranks is None:
        return list(work(items))
    batches = [list(range(start, min(start + batch_size, len(items)))) for start in range(0, len(items), batch_size)]
    mine = [i for batch in batches[ranks.rank::ranks.world] for i in batch]
    outputs = list(work([items[i] for i in mine])) if mine else []
    if len(outputs) != len(mine):
        raise RuntimeError(f"work returned {len(outputs)} outputs for {len(mine)} items")
    result: list[Any] = [None] * len(items)
    for indices, values in ranks.all_gather((mine, outputs)):
        for i, value in zip(indices, values):
            result[i] = value
    return result
