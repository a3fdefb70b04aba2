"""Placements put every stage on exactly one rank, as the placement tables in schedules/placement.py say."""

import pytest

from megatron_bitpipe.schedules import placement


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_bitpipe_rank_holds_the_design_table_chunks(num_ranks):
    layout = placement.bitpipe(num_ranks)
    per_pipeline = 2 * num_ranks
    for rank in range(num_ranks):
        down0, up1, down2, up3 = layout.rank_stages[rank]
        assert (down0, up1 - per_pipeline, down2, up3 - per_pipeline) == (
            rank,
            num_ranks - 1 - rank,
            2 * num_ranks - 1 - rank,
            num_ranks + rank,
        )


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_bitpipe_v_turn_stays_on_one_rank_in_both_pipelines(num_ranks):
    layout = placement.bitpipe(num_ranks)
    for pipeline in (0, 1):
        stages = layout.pipeline_stages(pipeline)
        turn = stages[num_ranks - 1]
        assert layout.rank_of(turn) == layout.rank_of(turn + 1)


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_bitpipe_replicas_of_a_stage_sit_on_mirrored_ranks(num_ranks):
    layout = placement.bitpipe(num_ranks)
    for stage in layout.pipeline_stages(0):
        replica = layout.replica_of(stage)
        assert layout.rank_of(replica) == num_ranks - 1 - layout.rank_of(stage)
        assert layout.position(replica) == layout.position(stage)


def test_bitpipe_each_pipeline_enters_at_its_own_end_rank():
    layout = placement.bitpipe(4)
    assert layout.rank_of(0) == 0 and layout.rank_of(8) == 3
    assert layout.rank_of(7) == 0 and layout.rank_of(15) == 3


def test_vshape_rank_holds_stage_r_and_its_mirror():
    assert placement.vshape(4).rank_stages == ((0, 7), (1, 6), (2, 5), (3, 4))


def test_looped_rank_holds_every_dth_stage():
    assert placement.looped(4, 2).rank_stages == ((0, 4), (1, 5), (2, 6), (3, 7))


def test_chimera_up_pipeline_enters_at_last_rank():
    layout = placement.chimera(4)
    assert [layout.rank_of(stage) for stage in layout.pipeline_stages(1)] == [3, 2, 1, 0]


def test_placement_rejects_a_stage_held_twice():
    with pytest.raises(ValueError, match="exactly one rank"):
        placement.Placement("broken", 2, 1, 2, ((0,), (0,)))
