"""The oracle: every schedule and layout trains like one process does.

Each launch runs ``megatron_bitpipe.train`` on CPU/gloo with several schedules one after the
other in one process group (same initial weights, same data), and every schedule is compared with
``--pipeline-schedule none`` on one process (megatron-core's forward_backward_no_pipelining):

* the ``lm loss`` log line of every iteration and the validation loss (a forward-only step):
  1e-5 relative;
* the reduced gradients of iteration 1 (without a distributed optimizer): 1e-5 of each tensor's
  largest value;
* the parameters after five Adam steps: 1e-5 of each tensor's largest value, plus 1e-3 x lr.
  Adam divides by sqrt(v) + eps, so a gradient that is ~0 up to fp32 rounding (the key bias is
  exactly 0 in theory) turns its rounding noise into an update of up to ~lr x noise / eps;
  parameters that start at 0 cannot match to a relative tolerance. eps = 1e-6 (far below the
  real gradients, ~1e-4) keeps that noise ~1e-4 x lr; a wrong gradient moves them by ~lr.

Bidirectional schedules also log that the two replicas of every stage are bitwise identical
(training raises otherwise). Spawning costs ~15 s per launch on two cores.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from runs import (
    HELD,
    PEAK,
    SKIPPED,
    logged_grad_norms,
    logged_list,
    logged_losses,
    run,
    sections,
    succeeded,
)

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

LR = 1e-4
MODEL = (
    "--num-layers 16 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
    "--micro-batch-size 2 --global-batch-size 16 --train-iters 5 --eval-iters 1 "
    f"--lr {LR} --adam-eps 1e-6 --seed 1234"
).split()
BIDIRECTIONAL = {"bitpipe", "bitpipe-official", "chimera"}
STASH = re.compile(r"stashed activations per pipeline rank: measured (\[.*?\]), simulated (\[.*?\])")


def launch(processes: int, arguments: list[str], timeout: int = 420) -> str:
    """Run the trainer (torchrun for several processes) on MODEL; return its stdout."""
    target = ["-m", "megatron_bitpipe.train", *MODEL, *arguments]
    return succeeded(run(processes, target, timeout=timeout))


def worst_relative(reference: dict, other: dict) -> float:
    """max over tensors of max|a - b| / max|a|."""
    assert set(reference) == set(other), sorted(set(reference) ^ set(other))
    return max(
        float((reference[n] - other[n]).abs().max() / reference[n].abs().max().clamp_min(1e-30))
        for n in reference
    )


def assert_matches(
    reference: dict, saved: dict, reference_log: str, log: str, schedule: str
) -> None:
    assert logged_losses(log) == pytest.approx(logged_losses(reference_log), rel=1e-5), schedule
    assert logged_grad_norms(log) == pytest.approx(logged_grad_norms(reference_log), rel=1e-5), schedule
    assert saved["lm_loss"] == pytest.approx(reference["lm_loss"], rel=1e-5), schedule
    assert saved["validation_lm_loss"] == pytest.approx(reference["validation_lm_loss"], rel=1e-5)
    if saved["first_gradients"]:
        assert worst_relative(reference["first_gradients"], saved["first_gradients"]) < 1e-5, (
            schedule
        )
    expected, found = reference["parameters"], saved["parameters"]
    assert set(expected) == set(found), sorted(set(expected) ^ set(found))
    for name, value in expected.items():
        bound = 1e-5 * float(value.abs().max()) + 1e-3 * LR
        assert float((value - found[name]).abs().max()) <= bound, f"{schedule}: {name}"
    if schedule in BIDIRECTIONAL:
        assert "the replicas of every stage are bitwise identical" in log, schedule
    if not schedule.startswith("megatron-"):
        stash = STASH.search(log)
        assert stash is not None and stash.group(1) == stash.group(2), schedule


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[bool, tuple[dict, str]]:
    """Single-process runs, tied and untied embeddings: (saved file, log)."""
    folder = tmp_path_factory.mktemp("reference")
    result = {}
    for untied in (False, True):
        path = folder / f"untied{untied}.pt"
        extra = ["--untie-embeddings-and-output-weights"] if untied else []
        log = launch(1, ["--pipeline-schedule", "none", "--save-params", str(path), *extra])
        result[untied] = (torch.load(path), log)
    return result


LAYOUTS = {
    # name: (processes, arguments, schedules run one after the other)
    "pp2-untied": (
        2,
        "--pipeline-model-parallel-size 2 --untie-embeddings-and-output-weights",
        "bitpipe chimera v-zb 1f1b zb-h1 bitpipe-zb",
    ),
    "pp4-overlap": (
        4,
        "--pipeline-model-parallel-size 4 --overlap-grad-reduce "
        "--virtual-pipeline-model-parallel-size 2",
        "bitpipe bitpipe-official bitpipe-zb chimera gpipe 1f1b interleaved-1f1b breadth-first "
        "zb-h1 v-min v-half v-zb megatron-interleaved",
    ),
    "pp4-replica-pairs": (
        4,
        "--pipeline-model-parallel-size 4 --pipeline-rank-order replica-pairs",
        "bitpipe chimera 1f1b",
    ),
    "tp2-pp2-sequence-parallel": (
        4,
        "--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel",
        "bitpipe 1f1b zb-h1",
    ),
    "tp2-pp2": (
        4,
        "--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2",
        "bitpipe megatron-1f1b v-zb",
    ),
    "pp2-recompute-full": (
        2,
        "--pipeline-model-parallel-size 2 --recompute-granularity full --recompute-method uniform "
        "--recompute-num-layers 1",
        "zb-h1 v-min v-half v-zb",
    ),
    "pp2-recompute-selective": (
        2,
        "--pipeline-model-parallel-size 2 --recompute-granularity selective",
        "zb-h1 v-zb",
    ),
    "dp2-pp2-overlap": (
        4,
        "--pipeline-model-parallel-size 2 --overlap-grad-reduce",
        "bitpipe chimera",
    ),
    "dp2-pp2-overlap-distributed-optimizer": (
        4,
        "--pipeline-model-parallel-size 2 --overlap-grad-reduce --use-distributed-optimizer",
        "bitpipe v-zb bitpipe-zb",
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_schedule_trains_like_one_process(layout, references, tmp_path):
    processes, arguments, names = LAYOUTS[layout]
    schedules = names.split()
    reference, reference_log = references["--untie-embeddings-and-output-weights" in arguments]
    saved, trace = str(tmp_path / "{schedule}.pt"), str(tmp_path / "{schedule}.json")
    outputs = ["--save-params", saved, "--trace", trace]
    log = launch(
        processes, [*arguments.split(), "--pipeline-schedule", ",".join(schedules), *outputs]
    )
    if "replica-pairs" in arguments:
        assert "run in process slots [0, 3, 2, 1]; launch rank of each global rank: [0, 3, 2, 1]" in log
    by_schedule = sections(log)
    assert list(by_schedule) == schedules
    for schedule in schedules:
        result = torch.load(saved.replace("{schedule}", schedule))
        assert_matches(reference, result, reference_log, by_schedule[schedule], schedule)
        if not schedule.startswith("megatron-"):
            assert Path(trace.replace("{schedule}", schedule)).stat().st_size > 0


@pytest.fixture(scope="module")
def half_precision_references() -> dict[str, str]:
    """Single-process logs in bf16, and in fp16 with a loss scale that overflows twice."""
    return {flag: launch(1, ["--pipeline-schedule", "none", *FLAGS[flag]]) for flag in FLAGS}


FLAGS = {
    "bf16": ["--bf16"],
    "fp16": ["--fp16", "--initial-loss-scale", str(2**22), "--hysteresis", "1"],
}


def test_bf16_trains_close_to_fp32_on_one_process(references, half_precision_references):
    """bf16 (Float16Module + megatron's fp32 main-param optimizer) tracks the fp32 run."""
    bf16, fp32 = logged_losses(half_precision_references["bf16"]), logged_losses(references[False][1])
    assert len(bf16) == len(fp32) == 5
    assert bf16 == pytest.approx(fp32, rel=1e-2)
    assert bf16 != fp32  # bf16 really ran: its rounding shows in the losses


def test_bf16_at_pp4_tracks_the_bf16_single_process_run_for_v_and_bidirectional(
    half_precision_references,
):
    """Casts follow each chunk's own pre/post process: rank 3 of bitpipe holds middle stages."""
    schedules = ["bitpipe", "v-half", "chimera"]
    log = launch(4, ["--pipeline-model-parallel-size", "4", "--bf16", "--pipeline-schedule", ",".join(schedules)])
    expected = logged_losses(half_precision_references["bf16"])
    for schedule, part in sections(log).items():
        assert logged_losses(part) == pytest.approx(expected, rel=1e-2), schedule
        assert "bitwise identical" in part or schedule == "v-half"


def test_fp16_skips_the_same_iterations_as_one_process_on_both_replicas(half_precision_references):
    """Dynamic loss scaling: overflowing steps are skipped on every rank alike (the replicas
    stay bitwise identical) and the scale falls as on one process."""
    reference = half_precision_references["fp16"]
    skipped = SKIPPED.findall(reference)
    assert skipped[:3] == ["1", "1", "0"]  # the test sees skips and updates
    log = launch(4, ["--pipeline-model-parallel-size", "4", *FLAGS["fp16"], "--pipeline-schedule", "bitpipe,chimera"])
    for schedule, part in sections(log).items():
        assert SKIPPED.findall(part) == skipped, schedule
        assert logged_losses(part) == pytest.approx(logged_losses(reference), rel=1e-4), schedule
        assert "the replicas of every stage are bitwise identical" in part, schedule


def test_clipping_counts_each_stage_once_with_two_replicas(tmp_path):
    """--clip-grad 0.05 clips every step (the norm is ~1.5): the plain optimizer sees both
    replicas in its norm group, the distributed one shards each stage over the replica pair."""
    clip = ["--clip-grad", "0.05"]
    reference = launch(1, ["--pipeline-schedule", "none", *clip])
    assert min(logged_grad_norms(reference)) > 0.05
    runs = {
        "pp4": launch(4, ["--pipeline-model-parallel-size", "4", *clip, "--pipeline-schedule", "bitpipe,chimera"]),
        "dp2-pp2-distributed-optimizer": launch(
            4,
            [
                "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
                "--overlap-grad-reduce", *clip, "--pipeline-schedule", "bitpipe",
            ],
        ),
    }
    for layout, log in runs.items():
        parts = sections(log) or {"bitpipe": log}
        for schedule, part in parts.items():
            assert logged_grad_norms(part) == pytest.approx(logged_grad_norms(reference), rel=1e-5), (layout, schedule)
            assert logged_losses(part) == pytest.approx(logged_losses(reference), rel=1e-5), (layout, schedule)


def test_steps_make_no_host_sync_and_hold_megatrons_memory():
    """From iteration 2 the forward-backward step makes none of the calls that wait for a GPU;
    on the same order, each rank's peak memory is megatron's own, plus on gloo the sends not yet
    known complete (gloo reports a send complete only once waited on)."""
    schedules = [
        "1f1b", "megatron-1f1b", "interleaved-1f1b", "megatron-interleaved", "bitpipe", "chimera", "v-zb",
    ]
    log = launch(
        4,
        [
            "--pipeline-model-parallel-size", "4", "--virtual-pipeline-model-parallel-size", "2",
            "--check-host-syncs", "--measure-memory", "--pipeline-schedule", ",".join(schedules),
        ],
    )
    parts = sections(log)
    assert list(parts) == schedules
    for schedule, part in parts.items():
        assert "host syncs in the step (iterations 2-5): none" in part, schedule
    for ours, theirs in (("1f1b", "megatron-1f1b"), ("interleaved-1f1b", "megatron-interleaved")):
        peak, held = logged_list(PEAK, parts[ours]), logged_list(HELD, parts[ours])
        reference = logged_list(PEAK, parts[theirs])
        for rank in range(4):
            assert 0.95 * reference[rank] <= peak[rank] <= reference[rank] + held[rank], (ours, rank)


def test_bf16_and_fp16_exclude_each_other_before_any_process_group():
    from megatron_bitpipe.train import ArgumentsError, build_parser, validate_args

    args = build_parser().parse_args([*MODEL, "--pipeline-model-parallel-size", "2", "--bf16", "--fp16"])
    with pytest.raises(ArgumentsError, match="--bf16 and --fp16 exclude each other"):
        validate_args(args, world_size=2)
