"""Every single-pipeline schedule's CSV passes torch.distributed.pipelining's own validator."""

import pytest

from megatron_bitpipe.schedules import build, get, names

SINGLE_PIPELINE = [name for name in names() if not get(name).bidirectional]
GRID = [(ranks, ranks * factor) for ranks in (2, 4, 8) for factor in (2, 4)]


@pytest.mark.parametrize("name", SINGLE_PIPELINE)
@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_csv_passes_torch_pipelining_validator(name, num_ranks, num_microbatches):
    torch_schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    options = {"vp": 2} if "vp" in get(name).options else {}
    schedule = build(name, num_ranks, num_microbatches, **options)
    actions = {
        rank: [torch_schedules._Action.from_str(cell) for cell in line.split(",")]
        for rank, line in enumerate(schedule.to_csv().splitlines())
    }
    stage_to_rank = torch_schedules._validate_schedule(
        actions, num_ranks, schedule.placement.num_stages, num_microbatches
    )
    placement = schedule.placement
    assert stage_to_rank == {stage: placement.rank_of(stage) for stage in range(placement.num_stages)}


def test_every_single_pipeline_schedule_is_checked():
    assert {"gpipe", "1f1b", "interleaved-1f1b", "breadth-first", "zb-h1", "v-min", "v-half", "v-zb"} <= set(
        SINGLE_PIPELINE
    )
