"""A collection sharded over torch.distributed ranks: ``torchrun --nproc-per-node N -m analysis collect ...``.

Every rank loads the model and the examples and works out the same run id. The capture stage is sharded:
the batches that need capturing are dealt out in rounds of N (batch j of a round to rank j); each rank runs
its batch's forward + backward on its own device and the factors are gathered to rank 0
(``gather_object``), which alone writes the run's files (checkpoints, final arrays) and runs the analysis
stage. A batch's factors do not depend on which rank computed it, so 1 and N processes give the same
arrays (bitwise on the CPU). Backend: gloo on the CPU, nccl on GPUs (rank r uses ``cuda:<LOCAL_RANK>``).

Protocol (rank 0 -> others, ``broadcast_object_list``): ``("capture", module names, rounds)`` starts a pass's
capture (rounds: lists of batch indices, one per rank at most); before each round ``("go",)``; at the end
``("done",)`` (the others then read the finished run from the shared store) or ``("stop", message)`` when rank
0 was cancelled or failed (the others raise). Rank 0 sends ``done``/``stop`` from a ``finally``, so no rank
waits forever on a failed leader.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Ranks", "follow", "start"]


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

    def close(self) -> None:
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def start(device: torch.device) -> tuple[Ranks | None, torch.device]:
    """Join the process group when this process is one of several (torchrun's ``WORLD_SIZE`` > 1, or a group
    already initialised); returns (None, device) for a single process. On GPUs rank r uses
    ``cuda:<LOCAL_RANK>`` (the returned device)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        ranks = Ranks(dist.get_rank(), dist.get_world_size())
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), created=True)
    else:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", ranks.rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return ranks, device


def follow(ranks: Ranks, capture: Callable[[int, list[str]], Any], on_stop: Callable[[str], Exception]) -> None:
    """The loop of a rank other than 0: capture its share of each round (``capture(batch index, module
    names)`` -> what rank 0 gathers) until rank 0 says ``done``; ``stop`` raises ``on_stop(message)``."""
    while True:
        message = ranks.receive()
        if message[0] == "done":
            return
        if message[0] == "stop":
            raise on_stop(message[1])
        _, names, rounds = message
        for batches in rounds:
            signal = ranks.receive()
            if signal[0] == "stop":
                raise on_stop(signal[1])
            mine = batches[ranks.rank] if ranks.rank < len(batches) else None
            ranks.gather(None if mine is None else capture(mine, names))
