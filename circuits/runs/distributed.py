"""Dataset runs under `torchrun`: which process this is, its shard of the pending items,
and the barrier between phases. No scheduler of our own: torch.distributed does the
rendezvous (single node or multi-node), this module only reads it.

    torchrun --standalone --nproc-per-node 4 -m circuits.cli identify --model ... --out run/

Each rank streams a disjoint, deterministic set of whole batches of the pending items
(`shard_batches`), writes its own parquet parts and its own manifest part
(`circuits.runs.results.RunStore`), and a run is complete when every shard is. Because the
batches are the ones a single process would form, results are identical whatever the
number of processes, and a rerun with any number resumes every shard.

See https://pytorch.org/docs/stable/elastic/run.html (torchrun environment variables) and
https://pytorch.org/docs/stable/distributed.html (process groups, backends, barrier);
docs/scaling.md for the commands and which analyses run sharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Collection, Optional, Sequence

import torch
import torch.distributed as dist

# Runs whose results need all the data in one process (fits, statistics over the whole set);
# they refuse to run sharded rather than silently compute per-shard results. Why, per analysis:
# Shard-safe (per-image rows, statistics computed when the tables are read): identify,
# perturb / token_removal, explain, memories.
NOT_SHARDED = {
    "probes": "the probes are fitted on the training images before the test pass and would be refitted per rank",
    "decompose": "the reference-set fit (component scores, ablation order, bases) is written once before the data pass",
    "circuit": "edge scores are averaged over all images in one pass and the circuit is pruned from them",
}


@dataclass(frozen=True)
class Dist:
    """This process' place in the run: rank in [0, world)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process)."""
        if self.world > 1:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; "
                         "launch with torchrun, which sets it") from None


def init_distributed() -> Dist:
    """The current process' rank and world size, initialising the process group if torchrun
    launched several processes and nobody did yet (gloo on CPU, nccl with CUDA; each rank on
    its LOCAL_RANK's GPU)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Dist()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def require_single_process(analysis: str, d: Optional[Dist] = None) -> None:
    """Refuse a sharded run of an analysis that needs all the data in one process."""
    d = d if d is not None else init_distributed()
    if d.world > 1:
        raise ValueError(f"{analysis} does not run sharded yet ({NOT_SHARDED[analysis]}); "
                         f"run it as one process (without torchrun), world size is {d.world}")


def shard_batches(indices: Sequence[int], done: Collection[int], batch_size: int, d: Dist) -> list[list[int]]:
    """This rank's batches of the not-done items of `indices`: grouped by their batch of the
    full run (position in `indices` // batch_size), every world-th group from this rank's.

    Grouping by the full run's batches (not by the pending list) keeps each batch the same
    items whether fresh, resumed or sharded, so per-batch seeds and batched arithmetic agree.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        if index in done:
            continue
        groups.setdefault(position // batch_size, []).append(index)
    blocks = [groups[key] for key in sorted(groups)]
    return blocks[d.rank::d.world]
