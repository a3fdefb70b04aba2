"""Where each stage lives: stage -> (rank, local chunk), for every placement the generators use.

``rank_stages[rank][chunk]`` is the global stage held as local chunk ``chunk`` (the index into
Megatron's model list). Stages ``0..S-1`` are the down pipeline, ``S..2S-1`` the up pipeline.

    looped(4, 2)   rank r: stages r, r+4          (Megatron interleaved, breadth-first)
    vshape(4)      rank r: stages r, 7-r          (V-Min / V-Half / V-ZB)
    chimera(4)     rank r: down r, up 3-r
    bitpipe(4)     rank r: down r, up 3-r, down 7-r, up 4+r
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """A declared stage layout; every lookup derives from ``rank_stages``."""

    kind: str
    num_ranks: int
    num_pipelines: int
    stages_per_pipeline: int
    rank_stages: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        held = sorted(stage for stages in self.rank_stages for stage in stages)
        if held != list(range(self.num_stages)):
            raise ValueError(f"placement {self.kind}: every stage must live on exactly one rank")
        if len(self.rank_stages) != self.num_ranks:
            raise ValueError(f"placement {self.kind}: expected {self.num_ranks} ranks")

    @property
    def num_stages(self) -> int:
        return self.num_pipelines * self.stages_per_pipeline

    @property
    def chunks_per_rank(self) -> int:
        return len(self.rank_stages[0])

    @property
    def stage_ranks(self) -> tuple[int, ...]:
        """Rank of every stage, indexed by global stage: the lookup table hot loops use."""
        cached = self.__dict__.get("_stage_rank_cache")
        if cached is None:
            cached = tuple(self.rank_of(stage) for stage in range(self.num_stages))
            object.__setattr__(self, "_stage_rank_cache", cached)
        return cached

    def rank_of(self, stage: int) -> int:
        return self._locations()[stage][0]

    def chunk_of(self, stage: int) -> int:
        """Local chunk index of ``stage`` on its rank."""
        return self._locations()[stage][1]

    def pipeline_of(self, stage: int) -> int:
        return stage // self.stages_per_pipeline

    def position(self, stage: int) -> int:
        """Index of ``stage`` within its own pipeline (0 = holds the embedding)."""
        return stage % self.stages_per_pipeline

    def pipeline_stages(self, pipeline: int) -> range:
        start = pipeline * self.stages_per_pipeline
        return range(start, start + self.stages_per_pipeline)

    def next_stage(self, stage: int) -> int | None:
        return None if self.is_last(stage) else stage + 1

    def prev_stage(self, stage: int) -> int | None:
        return None if self.is_first(stage) else stage - 1

    def is_first(self, stage: int) -> bool:
        return self.position(stage) == 0

    def is_last(self, stage: int) -> bool:
        return self.position(stage) == self.stages_per_pipeline - 1

    def loss_ranks(self) -> frozenset[int]:
        """Ranks that hold a last stage: the ones that compute a loss."""
        return frozenset(self.rank_of(stage) for stage in range(self.num_stages) if self.is_last(stage))

    def replica_of(self, stage: int) -> int | None:
        """The same layers in the other pipeline, or None for single-direction placements."""
        if self.num_pipelines == 1:
            return None
        return (stage + self.stages_per_pipeline) % self.num_stages

    def _locations(self) -> dict[int, tuple[int, int]]:
        cached = self.__dict__.get("_location_cache")
        if cached is None:
            cached = {
                stage: (rank, chunk)
                for rank, stages in enumerate(self.rank_stages)
                for chunk, stage in enumerate(stages)
            }
            object.__setattr__(self, "_location_cache", cached)
        return cached


def _check_ranks(num_ranks: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"pipeline size must be >= 1, got {num_ranks}")


def looped(num_ranks: int, chunks_per_rank: int = 1) -> Placement:
    """Megatron's interleaved placement: rank r holds stages r, r+D, r+2D, ..."""
    _check_ranks(num_ranks)
    stages = tuple(
        tuple(chunk * num_ranks + rank for chunk in range(chunks_per_rank)) for rank in range(num_ranks)
    )
    return Placement("looped", num_ranks, 1, num_ranks * chunks_per_rank, stages)


def vshape(num_ranks: int) -> Placement:
    """V placement: rank r holds stages r and 2D-1-r; the turn D-1 -> D is local to rank D-1."""
    _check_ranks(num_ranks)
    stages = tuple((rank, 2 * num_ranks - 1 - rank) for rank in range(num_ranks))
    return Placement("vshape", num_ranks, 1, 2 * num_ranks, stages)


def chimera(num_ranks: int) -> Placement:
    """Chimera: down stage r on rank r, up stage k on rank D-1-k; rank r holds down r and up D-1-r."""
    _check_ranks(num_ranks)
    stages = tuple((rank, num_ranks + num_ranks - 1 - rank) for rank in range(num_ranks))
    return Placement("chimera", num_ranks, 2, num_ranks, stages)


def bitpipe(num_ranks: int) -> Placement:
    """BitPipe (arXiv 2410.19367): chunks hold down r, up D-1-r, down 2D-1-r, up D+r; S = 2D."""
    _check_ranks(num_ranks)
    per_pipeline = 2 * num_ranks
    stages = tuple(
        (
            rank,
            per_pipeline + num_ranks - 1 - rank,
            2 * num_ranks - 1 - rank,
            per_pipeline + num_ranks + rank,
        )
        for rank in range(num_ranks)
    )
    return Placement("bitpipe", num_ranks, 2, per_pipeline, stages)
