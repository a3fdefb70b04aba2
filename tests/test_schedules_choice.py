"""The schedule-choice value: parsing, its properties, one build, and structured config errors."""

import pickle

import pytest

from megatron_bitpipe.schedules import ScheduleConfigError
from megatron_bitpipe.schedules.choice import ScheduleChoice, known_names, parse
from megatron_bitpipe.schedules.flags import CLI, MEGATRON_LM, TRAINER, words


def test_parse_splits_the_comma_list_and_drops_blanks():
    assert parse(" bitpipe, ,megatron-interleaved,none ") == (
        ScheduleChoice("bitpipe"),
        ScheduleChoice("megatron-interleaved"),
        ScheduleChoice("none"),
    )
    assert parse(" , ") == ()


@pytest.mark.parametrize(
    "name, megatron, reference, virtual",
    [
        ("bitpipe", False, False, False),
        ("interleaved-1f1b", False, False, True),
        ("megatron-1f1b", True, False, False),
        ("megatron-interleaved", True, False, True),
        ("none", True, True, False),
    ],
)
def test_properties_replace_the_name_tests(name, megatron, reference, virtual):
    choice = ScheduleChoice(name)
    assert (choice.is_megatron, choice.is_reference, choice.takes_virtual_size) == (
        megatron,
        reference,
        virtual,
    )
    assert choice.uses_registry is not megatron and name in known_names()


def test_a_choice_builds_once_and_compares_by_name_and_options():
    choice = ScheduleChoice("bitpipe")
    assert choice.build(4, 8) is choice.build(4, 8)
    assert choice.placement(4, 8) is choice.build(4, 8).placement
    assert choice == ScheduleChoice("bitpipe") and hash(choice) == hash(ScheduleChoice("bitpipe"))
    assert ScheduleChoice("megatron-1f1b").build(4, 8) is None
    twin = ScheduleChoice("megatron-interleaved", (("vp", 2),))
    assert twin.build(4, 8).name == "interleaved-1f1b" and twin.placement(4).chunks_per_rank == 2


def test_config_errors_carry_option_value_rule_and_render_per_front_end():
    with pytest.raises(ScheduleConfigError) as raised:
        ScheduleChoice("bitpipe").build(4, 6)
    error = raised.value
    assert (error.schedule, error.option, error.value) == ("bitpipe", "microbatches", 6)
    assert str(error) == error.in_words(words(CLI))
    assert str(error).startswith("bitpipe: --microbatches 6 must be a multiple of --pp 4: ")
    assert error.in_words(words(TRAINER)).startswith(
        "bitpipe: 6 microbatches per data-parallel rank must be a multiple of "
        "--pipeline-model-parallel-size 4: "
    )
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_the_launcher_names_the_virtual_size_by_its_own_flag():
    with pytest.raises(ScheduleConfigError) as raised:
        ScheduleChoice("interleaved-1f1b", (("vp", 1),)).build(4, 8)
    assert raised.value.in_words(words(MEGATRON_LM)).startswith(
        "interleaved-1f1b: --num-virtual-stages-per-pipeline-rank 1 must be >= 2"
    )
