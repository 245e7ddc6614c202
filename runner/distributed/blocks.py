"""How a Ray run cuts its input into blocks and spreads them over its sending actors (Shape), and what
the blocks' reports add up to on the driver (Progress). Ray-free: the driver imports it before it knows
whether Ray is needed at all."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.plan import RequestKeys

BLOCK_ROWS = 500  # rows per block sent by one actor call: a unit of retry and of journal flushing
ACTORS = (2, 4)  # sending actors: at least, at most (Ray Data scales between them)


@dataclass
class Shape:
    """How the run is spread: actors, rows per block, the CPU share of an actor (they wait on I/O)."""

    actors: tuple[int, int] = ACTORS
    block_rows: int = BLOCK_ROWS
    actor_cpus: float = 0.25

    def pool(self, blocks: int) -> tuple[int, int]:
        """The fewest and most sending actors for a run of `blocks` blocks: never more than it has blocks
        (an actor with no block to send is seconds of start-up for nothing, and Ray Data warns of it)."""
        most = max(1, min(self.actors[1], blocks))
        return min(self.actors[0], most), most


@dataclass
class Progress:
    """What the block reports added up to, on the driver."""

    # Keys counted in the tally (identical prompts count once): one per request of the run, so 16 bytes a
    # key (runner.plan.RequestKeys) rather than a set of str's ~120 (1.2 GB at 10M rows).
    recorded: RequestKeys = field(default_factory=RequestKeys)
    deferred: set[str] = field(default_factory=set)  # keys a block left to the block that claimed them
    workers: set[str] = field(default_factory=set)
