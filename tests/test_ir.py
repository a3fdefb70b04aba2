"""The action text form and the CSV form are exact inverses of printing."""

import pytest

from megatron_bitpipe.schedules.ir import Action, Kind, parse_programs
from schedule_fixtures import one_f_one_b


@pytest.mark.parametrize("kind", list(Kind))
def test_action_text_round_trips_for_every_kind(kind):
    action = Action(12, kind, None if kind is Kind.REDUCE_GRAD else 7)
    assert Action.parse(str(action)) == action


def test_action_text_matches_torch_pipelining_notation():
    assert str(Action(5, Kind.F, 2)) == "5F2"
    assert str(Action(3, Kind.SEND_F, 1)) == "3SEND_F1"
    assert str(Action(1, Kind.REDUCE_GRAD)) == "1REDUCE_GRAD"


def test_unparseable_action_names_the_expected_form():
    with pytest.raises(ValueError, match="<stage><kind><microbatch>"):
        Action.parse("F5")


def test_csv_has_one_line_per_rank_and_parses_back():
    schedule = one_f_one_b(4, 8)
    text = schedule.to_csv()
    assert text.splitlines()[0].startswith("0F0,0F1,0F2,0F3,0B0,0F4")
    assert len(text.splitlines()) == 4
    assert parse_programs(text) == schedule.programs


def test_registry_rejects_an_option_a_schedule_does_not_take_naming_the_flag():
    from megatron_bitpipe.schedules import build
    from megatron_bitpipe.schedules.errors import ScheduleConfigError

    with pytest.raises(ScheduleConfigError, match=r"1f1b: --vp not accepted; this schedule takes: none"):
        build("1f1b", 4, 8, vp=2)
