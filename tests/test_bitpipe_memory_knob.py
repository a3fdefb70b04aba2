"""``max_stash``: the BitPipe memory/time knob of ``bitpipe`` and ``bitpipe-zb`` (issue 16, item 5)."""

from __future__ import annotations

import pytest

from megatron_bitpipe.runtime.nccl_rules import check_first_step
from megatron_bitpipe.schedules import bitpipe, bitpipe_zb
from megatron_bitpipe.schedules.errors import ScheduleConfigError
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.registry import build
from megatron_bitpipe.schedules.simulate import Costs, simulate
from megatron_bitpipe.schedules.validate import validate

COSTS = {
    "bitpipe": Costs(forward=1, backward=2),
    "bitpipe-zb": Costs(forward=1, backward=2, input_grad=1, weight_grad=1),
}
NAMES = tuple(COSTS)


def caps(num_ranks: int) -> list[int]:
    """Every accepted cap up to D=8, a ladder of D/4 steps above."""
    return list(range(num_ranks, 3 * num_ranks + 1, 1 if num_ranks <= 8 else num_ranks // 4))


def idle_and_peak(name: str, num_ranks: int, num_microbatches: int, cap: int | None) -> tuple[float, int]:
    result = simulate(build(name, num_ranks, num_microbatches, max_stash=cap), COSTS[name])
    return result.makespan - max(result.busy), max(result.peak_activations)


GRID = [(name, d, c) for name in NAMES for d in (2, 4, 8, 16) for c in caps(d)]


@pytest.mark.parametrize(("name", "num_ranks", "cap"), GRID)
def test_peak_stash_is_at_most_the_cap(name, num_ranks, cap):
    _, peak = idle_and_peak(name, num_ranks, 4 * num_ranks, cap)
    assert peak <= cap


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_ranks", [2, 4, 8, 16])
def test_idle_never_grows_with_the_cap(name, num_ranks):
    idles = [idle_and_peak(name, num_ranks, 4 * num_ranks, cap)[0] for cap in caps(num_ranks)]
    assert idles == sorted(idles, reverse=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_ranks", [4, 8, 16])
def test_a_cap_of_d_stashes_half_of_the_default_and_idles_more(name, num_ranks):
    default_idle, default_peak = idle_and_peak(name, num_ranks, 4 * num_ranks, None)
    capped_idle, capped_peak = idle_and_peak(name, num_ranks, 4 * num_ranks, num_ranks)
    assert (default_peak, capped_peak) == (2 * num_ranks, num_ranks)
    assert capped_idle > default_idle


@pytest.mark.parametrize("num_ranks", [4, 8, 16])
def test_bitpipe_idles_less_above_2d(num_ranks):
    default_idle, _ = idle_and_peak("bitpipe", num_ranks, 4 * num_ranks, None)
    top_idle, _ = idle_and_peak("bitpipe", num_ranks, 4 * num_ranks, 3 * num_ranks)
    assert top_idle < default_idle


@pytest.mark.parametrize("num_ranks", [2, 4, 8, 16])
def test_bitpipe_zb_default_is_already_the_least_idle_above_2d(num_ranks):
    default = idle_and_peak("bitpipe-zb", num_ranks, 4 * num_ranks, None)
    assert idle_and_peak("bitpipe-zb", num_ranks, 4 * num_ranks, 3 * num_ranks) == default
    assert default[0] == num_ranks // 2 - 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_ranks", [2, 4, 8, 16])
def test_every_n_and_cap_builds_without_deadlock(name, num_ranks):
    for units in range(1, 9):
        for cap in (num_ranks, (3 * num_ranks) // 2, 2 * num_ranks, 3 * num_ranks):
            schedule = build(name, num_ranks, units * num_ranks, max_stash=cap)
            assert max(simulate(schedule, COSTS[name]).peak_activations) <= cap


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("num_ranks", "cap"), [(4, 4), (4, 6), (4, 12), (8, 8), (8, 12), (8, 20)])
def test_capped_orders_lower_and_pass_the_nccl_replay(name, num_ranks, cap):
    lowered = lower(build(name, num_ranks, 4 * num_ranks, max_stash=cap), grad_sync=True)
    validate(lowered)
    check_first_step(lowered, connections=1)


@pytest.mark.parametrize("num_ranks", [2, 4, 8, 16])
@pytest.mark.parametrize("units", [1, 2, 4, 8])
def test_bitpipe_default_is_unchanged(num_ranks, units):
    n = units * num_ranks
    schedule = build("bitpipe", num_ranks, n)
    order = bitpipe._choose_order(num_ranks, n, num_ranks)
    expected = {
        "reordered": bitpipe.reordered_programs,
        "steady": bitpipe.steady_programs,
        "official": bitpipe.official_programs,
    }[order](num_ranks, n)
    assert schedule.programs == expected
    assert dict(schedule.options) == {"max_inflight": num_ranks, "order": order}


@pytest.mark.parametrize("num_ranks", [2, 4, 8, 16])
@pytest.mark.parametrize("units", [1, 2, 4, 8])
def test_bitpipe_zb_default_is_unchanged(num_ranks, units):
    schedule = build("bitpipe-zb", num_ranks, units * num_ranks)
    assert schedule.programs == bitpipe_zb.default_programs(num_ranks, units * num_ranks)
    assert schedule.options == ()


@pytest.mark.parametrize("num_ranks", [4, 8])
def test_a_2d_cap_gives_the_default_bitpipe_order(num_ranks):
    capped = build("bitpipe", num_ranks, 4 * num_ranks, max_stash=2 * num_ranks)
    assert capped.programs == build("bitpipe", num_ranks, 4 * num_ranks).programs


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cap", [3, 13])
def test_out_of_range_cap_is_refused_naming_the_flag_and_rule(name, cap):
    with pytest.raises(ScheduleConfigError, match=rf"{name}: --max-stash {cap} must be between D = 4 and 3D = 12"):
        build(name, 4, 16, max_stash=cap)


def test_max_stash_and_max_inflight_exclude_each_other():
    with pytest.raises(ScheduleConfigError, match="--max-stash and --max-inflight exclude each other"):
        build("bitpipe", 4, 16, max_stash=8, max_inflight=4)


def test_capped_reordered_ends_splice_like_a_direct_reorder():
    ends = bitpipe.reordered_ends(8, 20, 10)
    spliced = bitpipe.reordered_programs(8, 64, ends)
    steady = bitpipe.steady_programs(8, 64)
    encoded = [bitpipe._encode(8, program) for program in steady]
    direct = bitpipe._reorder_ops(8, encoded, 20, 10)
    assert spliced == tuple(bitpipe._decode(8, program) for program in direct)


def test_stretched_orders_have_their_listed_peak_at_any_n():
    stretch = bitpipe.Stretch(4, 4, 0)
    peaks = {bitpipe.stash_peak(bitpipe.stretched_programs(8, n, stretch)) for n in (32, 64)}
    assert peaks == {12}
