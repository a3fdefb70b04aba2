"""train.py refuses impossible settings before any process group exists, naming setting and rule."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_bitpipe.run_plan import ArgumentsError, validate_args
from megatron_bitpipe.train_args import build_parser


def plans(argv, world_size=4):
    return validate_args(build_parser().parse_args(argv), world_size)


@pytest.mark.parametrize(
    ("argv", "world_size", "expected"),
    [
        (
            [
                "--pipeline-model-parallel-size",
                "3",
                "--pipeline-schedule",
                "bitpipe",
                "--num-layers",
                "12",
                "--global-batch-size",
                "12",
            ],
            3,
            "must be even",
        ),
        (
            [
                "--pipeline-model-parallel-size",
                "4",
                "--pipeline-schedule",
                "bitpipe",
                "--num-layers",
                "12",
            ],
            4,
            "--num-layers 12 must be divisible by the 8 stages per pipeline",
        ),
        (
            [
                "--pipeline-model-parallel-size",
                "2",
                "--global-batch-size",
                "10",
                "--micro-batch-size",
                "4",
            ],
            4,
            "must be divisible by --micro-batch-size 4 x data-parallel size 2",
        ),
        (["--pipeline-model-parallel-size", "3"], 4, "world size 4 must be divisible"),
        (
            ["--pipeline-schedule", "nope", "--pipeline-model-parallel-size", "4"],
            4,
            "'nope' is unknown",
        ),
        (
            ["--pipeline-model-parallel-size", "4", "--pipeline-schedule", "megatron-interleaved"],
            4,
            "needs --virtual-pipeline-model-parallel-size",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "none"],
            2,
            "none needs --pipeline-model-parallel-size 1",
        ),
        (
            ["--pipeline-model-parallel-size", "4", "--virtual-pipeline-model-parallel-size", "2"],
            4,
            "not an option of --pipeline-schedule 1f1b",
        ),
        (
            [
                "--tensor-model-parallel-size",
                "2",
                "--sequence-parallel",
                "--num-attention-heads",
                "3",
                "--hidden-size",
                "33",
            ],
            2,
            "--num-attention-heads 3 must be divisible by --tensor-model-parallel-size 2",
        ),
        (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (
            [
                "--pipeline-schedule",
                "1f1b,bitpipe",
                "--pipeline-model-parallel-size",
                "4",
                "--save-params",
                "p.pt",
            ],
            4,
            "must contain {schedule}",
        ),
        (
            [
                "--pipeline-schedule",
                "megatron-1f1b",
                "--pipeline-model-parallel-size",
                "4",
                "--trace",
                "t.json",
            ],
            4,
            "--trace records the runtime executor",
        ),
    ],
)
def test_impossible_settings_are_refused_with_the_setting_named(argv, world_size, expected):
    with pytest.raises(ArgumentsError) as raised:
        plans(argv, world_size)
    assert expected in str(raised.value)


def test_a_schedule_list_resolves_one_plan_each_with_its_placement():
    resolved = plans(
        [
            "--pipeline-model-parallel-size",
            "4",
            "--pipeline-schedule",
            "bitpipe,interleaved-1f1b,megatron-interleaved,1f1b",
            "--virtual-pipeline-model-parallel-size",
            "2",
            "--save-params",
            "out_{schedule}.pt",
        ]
    )
    assert [
        (plan.schedule, plan.placement.kind, plan.placement.chunks_per_rank) for plan in resolved
    ] == [
        ("bitpipe", "bitpipe", 4),
        ("interleaved-1f1b", "looped", 2),
        ("megatron-interleaved", "looped", 2),
        ("1f1b", "looped", 1),
    ]
    assert resolved[0].num_microbatches == 8 and resolved[0].data_parallel_size == 1
    assert resolved[2].virtual_size == 2 and resolved[1].virtual_size is None
    assert resolved[0].output_path("out_{schedule}.pt") == "out_bitpipe.pt"


def test_layers_per_virtual_stage_gives_the_virtual_size():
    (plan,) = plans(
        [
            "--pipeline-model-parallel-size",
            "4",
            "--pipeline-schedule",
            "megatron-interleaved",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--num-layers",
            "8",
        ]
    )
    assert plan.virtual_size == 2


def test_the_command_line_reports_an_error_without_starting_processes():
    """The command itself, in a process of its own with nothing on PATH to start: exit status 2
    and one line (test_reliability checks every bad setting through ``main`` in-process)."""
    result = subprocess.run(
        [sys.executable, "-m", "megatron_bitpipe.train", "--pipeline-model-parallel-size", "2"],
        capture_output=True,
        text=True,
        check=False,
        env={"WORLD_SIZE": "1", "PATH": ""},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron_bitpipe.train: error: "), lines
    assert "world size 1 must be divisible" in lines[0]
