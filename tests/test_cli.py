"""The command line: what each subcommand prints, and how it refuses bad input."""

import json
import os
import subprocess
import sys

import pytest

from megatron_bitpipe import cli
from megatron_bitpipe.schedules import registry
from megatron_bitpipe.schedules.errors import ScheduleConfigError
from megatron_bitpipe.schedules.ir import parse_programs
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.simulate import Costs, simulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = registry.names()


def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def table_rows(out):
    """Simulate's table as {schedule: cells}, header included under "schedule"."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("schedule"))
    rows = {}
    for line in [lines[start]] + lines[start + 2 :]:
        if not line or line.startswith("peak act:"):
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_1f1b_is_registered():
    assert "1f1b" in SCHEDULES


def test_plan_csv_parses_into_one_program_per_rank(capsys):
    status, out, err = run(
        capsys, "plan", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--format", "csv"
    )
    assert (status, err) == (0, "")
    assert parse_programs(out) == registry.build("1f1b", 4, 8).programs


def test_plan_lowered_csv_carries_the_sends_and_receives(capsys):
    status, out, _ = run(
        capsys,
        "plan",
        "--schedule",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--format",
        "csv",
        "--lowered",
    )
    assert status == 0
    assert parse_programs(out) == lower(registry.build("1f1b", 2, 2)).programs


def test_plan_json_gives_programs_and_metadata(capsys):
    status, out, _ = run(
        capsys, "plan", "--schedule", "1f1b", "--pp", "2", "--microbatches", "3", "--format", "json"
    )
    document = json.loads(out)
    assert status == 0
    assert document["programs"] == [
        ["0F0", "0F1", "0B0", "0F2", "0B1", "0B2"],
        ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2"],
    ]
    assert (document["schedule"], document["num_ranks"], document["num_microbatches"]) == (
        "1f1b",
        2,
        3,
    )
    assert document["placement"]["rank_stages"] == [[0], [1]]
    assert document["microbatch_pipeline"] == [0, 0, 0]
    assert document["lowered"] is False


def test_plan_text_is_the_program_grid(capsys):
    status, out, _ = run(capsys, "plan", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2")
    assert status == 0
    assert out.splitlines()[1:] == ["rank 0 | 0F0 0F1 0B0 0B1", "rank 1 | 1F0 1B0 1F1 1B1"]


@pytest.mark.parametrize("name", SCHEDULES)
def test_plan_prints_every_registered_schedule_or_its_config_error(capsys, name):
    options = {"vp": 2} if "vp" in registry.get(name).options else {}
    flags = ["--vp", "2"] if options else []
    status, out, err = run(
        capsys,
        "plan",
        "--schedule",
        name,
        "--pp",
        "4",
        "--microbatches",
        "16",
        "--format",
        "csv",
        *flags,
    )
    try:
        expected = registry.build(name, 4, 16, **options).to_csv()
    except ScheduleConfigError as error:
        assert (status, err) == (2, f"megatron-bitpipe: error: {error}\n")
    else:
        assert (status, out) == (0, expected)


def test_simulate_all_prints_one_row_per_schedule_and_the_speed_up(capsys):
    status, out, _ = run(
        capsys, "simulate", "--schedule", "all", "--pp", "4", "--microbatches", "8", "--vp", "2"
    )
    rows = table_rows(out)
    assert status == 0
    assert set(rows) == {"schedule", *SCHEDULES}
    assert rows["schedule"][-2:] == ["vs", "1f1b"]
    assert rows["1f1b"][-1] == "1.00x"
    assert "not accepted" not in out  # --vp reaches only the schedules that take it


def test_simulate_speed_up_is_1f1b_makespan_over_the_schedules(capsys):
    status, out, _ = run(
        capsys,
        "simulate",
        "--schedule",
        "1f1b,gpipe",
        "--pp",
        "4",
        "--microbatches",
        "8",
        "--cost-b",
        "3",
    )
    rows = table_rows(out)
    costs = Costs(forward=1, backward=3)
    one_f_one_b = simulate(registry.build("1f1b", 4, 8), costs).makespan
    gpipe = simulate(registry.build("gpipe", 4, 8), costs).makespan
    assert status == 0
    assert rows["gpipe"][0] == f"{gpipe:g}"
    assert rows["gpipe"][-1] == f"{one_f_one_b / gpipe:.2f}x"


def test_simulate_scales_stage_costs_to_the_stage_size():
    schedule = registry.build("interleaved-1f1b", 4, 8, vp=2)
    costs = cli.stage_costs(schedule, Costs(forward=1, backward=2))
    assert (costs.forward, costs.backward) == (0.5, 1.0)


def test_simulate_compares_with_1f1b_even_when_it_is_not_asked_for(capsys):
    status, out, _ = run(
        capsys, "simulate", "--schedule", "gpipe", "--pp", "4", "--microbatches", "8"
    )
    assert status == 0
    assert table_rows(out)["gpipe"][-1] == "1.00x"


def test_simulate_gives_a_rejected_row_when_one_of_several_refuses_the_settings(capsys):
    status, out, _ = run(
        capsys,
        "simulate",
        "--schedule",
        "1f1b,bitpipe-official",
        "--pp",
        "3",
        "--microbatches",
        "6",
    )
    rows = table_rows(out)
    assert status == 0
    assert rows["bitpipe-official"][:2] == ["rejected:", "bitpipe-official:"]
    assert "--pp 3 must be even" in out


def test_simulate_with_model_sizes_adds_gib_columns(capsys):
    status, out, _ = run(
        capsys,
        "simulate",
        "--schedule",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "4",
        "--num-layers",
        "4",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "32",
    )
    header = table_rows(out)["schedule"]
    assert status == 0
    assert "GiB" in header and header.count("GiB") == 2


def test_simulate_grid_prints_each_schedules_time_grid(capsys):
    status, out, _ = run(
        capsys, "simulate", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--grid"
    )
    assert status == 0
    assert "rank 0 | 0F0 0F1   .   . 0B0 ---   . 0B1 ---   33.3%" in out


def assert_usage_error(status, err, *phrases):
    assert status == 2
    assert err.startswith("megatron-bitpipe: error: ")
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in err


def test_single_schedule_that_rejects_the_settings_exits_2_naming_the_setting(capsys):
    status, _, err = run(
        capsys, "simulate", "--schedule", "bitpipe-official", "--pp", "3", "--microbatches", "6"
    )
    assert_usage_error(status, err, "--pp 3")


def test_option_a_schedule_does_not_take_exits_2(capsys):
    status, _, err = run(
        capsys, "plan", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--vp", "2"
    )
    assert_usage_error(status, err, "vp")


def test_unknown_schedule_exits_2_listing_the_known_ones(capsys):
    status, _, err = run(
        capsys, "simulate", "--schedule", "1f1b,nope", "--pp", "2", "--microbatches", "2"
    )
    assert_usage_error(status, err, "--schedule 'nope'", "1f1b")


def test_partial_model_sizes_exit_2_naming_the_missing_flags(capsys):
    status, _, err = run(
        capsys,
        "simulate",
        "--schedule",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--num-layers",
        "4",
    )
    assert_usage_error(status, err, "--hidden-size", "--seq-length")


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--pp", "2", "--microbatches", "2"],
        ["simulate", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--cost-f", "0"],
        ["plan", "--schedule", "1f1b", "--pp", "two", "--microbatches", "2"],
        ["frobnicate"],
    ],
    ids=["missing-schedule", "zero-cost", "non-integer-pp", "unknown-command"],
)
def test_argparse_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".json", ".txt", ".png"])
def test_render_writes_the_format_its_suffix_names(capsys, tmp_path, suffix):
    if suffix == ".png":
        pytest.importorskip("matplotlib")
    out = tmp_path / f"schedule{suffix}"
    status, printed, _ = run(
        capsys,
        "render",
        "--schedule",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--out",
        str(out),
    )
    assert (status, printed) == (0, f"wrote {out}\n")
    data = out.read_bytes()
    expected_start = {
        ".csv": b"0F0,0F1,0B0,0B1\n",
        ".json": b'{"traceEvents"',
        ".txt": b"time ",
        ".png": b"\x89PNG",
    }
    assert data.startswith(expected_start[suffix])


def test_render_to_an_unknown_suffix_exits_2(capsys, tmp_path):
    status, _, err = run(
        capsys,
        "render",
        "--schedule",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--out",
        str(tmp_path / "x.svg"),
    )
    assert_usage_error(status, err, "--out", ".png")


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_bitpipe",
            "plan",
            "--schedule",
            "1f1b",
            "--pp",
            "2",
            "--microbatches",
            "2",
            "--format",
            "csv",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n",
        "",
    )
