"""This process's place among the processes a launcher started (torchrun, accelerate launch)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes that a launcher (``torchrun``,
    ``accelerate launch``) started: ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the
    environment; one process when none is set."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                   int(env.get("LOCAL_RANK", 0)))  # fmt: skip

    def shards(self, todo: Sequence[int]) -> list[int]:
        """This rank's share: every ``world``-th shard, so each does the same amount."""
        return list(todo[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            import torch

            torch.distributed.barrier()


def join(ranks: Ranks) -> bool:
    """Join the launcher's process group (gloo: it only synchronises here; a day's timeout, so
    ranks with uneven work wait for each other); True when this call created it."""
    import datetime

    import torch

    if ranks.world == 1 or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    if not torch.cuda.is_available():  # CPU ranks share the cores instead of oversubscribing
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return True
