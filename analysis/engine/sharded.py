"""A collection sharded over torch.distributed ranks: ``torchrun --nproc-per-node N -m analysis collect ...``.

Every rank loads the model and the examples and works out the same run id. The capture stage is sharded:
the batches that need capturing are dealt out in rounds of N (batch j of a round to rank j); each rank runs
its batch's forward + backward on its own device and the factors are gathered to rank 0
(``gather_object``), which alone writes the run's files (checkpoints, final arrays) and runs the analysis
stage. A batch's factors do not depend on which rank computed it, so 1 and N processes give the same
arrays (bitwise on the CPU). Joining the group and the messages: :mod:`analysis.core.distributed`.

Protocol (rank 0 -> others, ``broadcast_object_list``): ``("capture", module names, rounds)`` starts a pass's
capture (rounds: lists of batch indices, one per rank at most); before each round ``("go",)``; at the end
``("done",)`` (the others then read the finished run from the shared store) or ``("stop", message)`` when rank
0 was cancelled or failed (the others raise). Rank 0 sends ``done``/``stop`` from a ``finally``, so no rank
waits forever on a failed leader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from analysis.core.distributed import Ranks

__all__ = ["follow"]


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
