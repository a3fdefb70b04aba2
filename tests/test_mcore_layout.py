"""Which layers each chunk holds, which ranks tie embeddings locally, who pairs with whom.

Pure lookups on a Placement; they import megatron.core but start no processes.
"""

import pytest

pytest.importorskip("megatron.core")

from megatron_bitpipe.mcore.groups import replica_partner  # noqa: E402
from megatron_bitpipe.mcore.model import StageLayout, parameter_seed, ties_locally  # noqa: E402
from megatron_bitpipe.schedules.placement import bitpipe, chimera, looped, vshape  # noqa: E402


def chunk_layers(layout, rank):
    per_stage = layout.layers_per_stage
    return [
        list(range(layout.first_layer(rank, chunk), layout.first_layer(rank, chunk) + per_stage))
        for chunk in range(layout.placement.chunks_per_rank)
    ]


def test_bitpipe_layers_match_the_official_worked_example():
    # BitPipe's placement: 16 layers, D = 4, 2 layers per chunk
    layout = StageLayout(bitpipe(4), 16)
    assert chunk_layers(layout, 0) == [[0, 1], [6, 7], [14, 15], [8, 9]]
    assert chunk_layers(layout, 1) == [[2, 3], [4, 5], [12, 13], [10, 11]]
    assert chunk_layers(layout, 2) == [[4, 5], [2, 3], [10, 11], [12, 13]]
    assert chunk_layers(layout, 3) == [[6, 7], [0, 1], [8, 9], [14, 15]]


def test_looped_layers_equal_megatron_interleaved_offsets():
    # megatron: offset = vp_stage * L / vp + pp_rank * L / pp / vp
    layout = StageLayout(looped(4, 2), 16)
    for rank in range(4):
        for chunk in range(2):
            assert layout.first_layer(rank, chunk) == chunk * 8 + rank * 2
    assert layout.virtual_size() == 2 and layout.vp_stage(1) == 1


def test_vshape_and_chimera_layers_and_virtual_sizes():
    v = StageLayout(vshape(4), 16)
    assert chunk_layers(v, 0) == [[0, 1], [14, 15]] and v.virtual_size() == 2
    c = StageLayout(chimera(4), 16)
    assert chunk_layers(c, 0) == [[0, 1, 2, 3], [12, 13, 14, 15]] and c.virtual_size() is None
    assert StageLayout(looped(4, 1), 16).vp_stage(0) is None


def test_layers_must_split_evenly_over_the_stages():
    with pytest.raises(ValueError, match="--num-layers 12 must be divisible by the 8 stages"):
        StageLayout(bitpipe(4), 12)


@pytest.mark.parametrize(
    ("placement", "local"),
    [
        (bitpipe(4), True),
        (chimera(4), True),
        (vshape(4), True),
        (looped(4, 2), False),
        (looped(1, 1), False),
    ],
)
def test_embeddings_are_tied_inside_a_rank_when_every_embedding_rank_holds_a_head(placement, local):
    assert ties_locally(placement) is local


def test_replica_partner_is_the_mirrored_rank():
    assert [replica_partner(bitpipe(4), rank) for rank in range(4)] == [3, 2, 1, 0]
    assert [replica_partner(chimera(2), rank) for rank in range(2)] == [1, 0]
    assert replica_partner(looped(4, 2), 1) == 1


def test_parameter_seeds_depend_on_run_seed_and_global_name_only():
    assert parameter_seed(1, "decoder.layers.3.mlp.linear_fc1.weight") == parameter_seed(
        1, "decoder.layers.3.mlp.linear_fc1.weight"
    )
    assert parameter_seed(1, "decoder.layers.3.mlp.linear_fc1.weight") != parameter_seed(
        1, "decoder.layers.4.mlp.linear_fc1.weight"
    )
    assert parameter_seed(1, "a") != parameter_seed(2, "a")
