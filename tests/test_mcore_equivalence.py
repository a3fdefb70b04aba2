"""The oracle: every schedule and layout trains like one process does.

Each launch runs ``megatron_bitpipe.train`` on CPU/gloo with several schedules one after the
other in one process group (same initial weights, same data), and every schedule is compared with
``--pipeline-schedule none`` on one process (megatron-core's forward_backward_no_pipelining):

* the ``lm loss`` of every iteration (from ``--report``, which holds what the log line prints)
  and the validation loss (a forward-only step): 1e-5 relative;
* the reduced gradients of iteration 1 (without a distributed optimizer): 1e-5 of each tensor's
  largest value;
* the parameters after five Adam steps: 1e-5 of each tensor's largest value, plus 1e-3 x lr.
  Adam divides by sqrt(v) + eps, so a gradient that is ~0 up to fp32 rounding (the key bias is
  exactly 0 in theory) turns its rounding noise into an update of up to ~lr x noise / eps;
  parameters that start at 0 cannot match to a relative tolerance. eps = 1e-6 (far below the
  real gradients, ~1e-4) keeps that noise ~1e-4 x lr; a wrong gradient moves them by ~lr.

Bidirectional schedules also report that the two replicas of every stage are bitwise identical
(training raises otherwise). Spawning costs ~15 s per launch on two cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from runs import Trained, train

from megatron_bitpipe.megatron_lm import log as megatron_log
from megatron_bitpipe.run_report import grad_norms, losses, step_ms, values

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

LR = 1e-4
MODEL = (
    "--num-layers 16 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
    "--micro-batch-size 2 --global-batch-size 16 --train-iters 5 --eval-iters 1 "
    f"--lr {LR} --adam-eps 1e-6 --seed 1234"
).split()
BIDIRECTIONAL = {"bitpipe", "bitpipe-official", "chimera"}


def launch(processes: int, arguments: list[str], timeout: int = 420) -> Trained:
    """Run the trainer (torchrun for several processes) on MODEL, with its report."""
    return train(processes, [*MODEL, *arguments], timeout=timeout)


def worst_relative(reference: dict, other: dict) -> float:
    """max over tensors of max|a - b| / max|a|."""
    assert set(reference) == set(other), sorted(set(reference) ^ set(other))
    return max(
        float((reference[n] - other[n]).abs().max() / reference[n].abs().max().clamp_min(1e-30))
        for n in reference
    )


def assert_matches(
    reference: dict, saved: dict, reference_run: dict, entry: dict, schedule: str
) -> None:
    """``saved`` (--save-params) and ``entry`` (its report) of ``schedule`` against the single
    process's ``reference`` and ``reference_run``."""
    assert losses(entry) == pytest.approx(losses(reference_run), rel=1e-5), schedule
    assert grad_norms(entry) == pytest.approx(grad_norms(reference_run), rel=1e-5), schedule
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
        assert entry["replicas_identical"], schedule
    if not schedule.startswith("megatron-"):
        stash = entry["stashed_activations"]
        assert stash is not None and stash["measured"] == stash["simulated"], schedule


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[bool, tuple[dict, Trained]]:
    """Single-process runs, tied and untied embeddings: (saved file, the launch)."""
    folder = tmp_path_factory.mktemp("reference")
    result = {}
    for untied in (False, True):
        path = folder / f"untied{untied}.pt"
        extra = ["--untie-embeddings-and-output-weights"] if untied else []
        trained = launch(1, ["--pipeline-schedule", "none", "--save-params", str(path), *extra])
        result[untied] = (torch.load(path), trained)
    return result


def test_the_report_holds_what_the_log_line_prints(references):
    """``--report`` tells the run that Megatron-LM's log line prints, in full precision: the
    same losses and grad norms (the line rounds them to 7 digits), the floats --save-params
    keeps, and the run's settings."""
    saved, trained = references[False]
    entry = trained.only
    assert trained.report["complete"] and entry["complete"]
    assert len(losses(entry)) == 5 and len(step_ms(entry)) == 5
    assert losses(entry) == pytest.approx(megatron_log.losses(trained.log), rel=1e-6)
    assert grad_norms(entry) == pytest.approx(megatron_log.grad_norms(trained.log), rel=1e-6)
    assert losses(entry) == saved["lm_loss"]
    assert entry["validation_lm_loss"] == saved["validation_lm_loss"]
    assert values(entry, "learning_rate") == pytest.approx([LR] * 5)
    settings = trained.report["settings"]
    assert settings["schedules"] == ["none"] and settings["world_size"] == 1
    assert settings["num_microbatches"] == 8 and settings["global_batch_size"] == 16


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
    reference, reference_run = references["--untie-embeddings-and-output-weights" in arguments]
    saved, trace = str(tmp_path / "{schedule}.pt"), str(tmp_path / "{schedule}.json")
    outputs = ["--save-params", saved, "--trace", trace]
    trained = launch(
        processes, [*arguments.split(), "--pipeline-schedule", ",".join(schedules), *outputs]
    )
    if "replica-pairs" in arguments:
        assert "run in process slots [0, 3, 2, 1]; launch rank of each global rank: [0, 3, 2, 1]" in trained.log
    assert list(trained.schedules) == schedules
    for schedule, entry in trained.schedules.items():
        result = torch.load(saved.replace("{schedule}", schedule))
        assert_matches(reference, result, reference_run.only, entry, schedule)
        if not schedule.startswith("megatron-"):
            traced = trace.replace("{schedule}", schedule)
            assert Path(traced).stat().st_size > 0 and entry["trace"] == traced


@pytest.fixture(scope="module")
def half_precision_references() -> dict[str, dict]:
    """Single-process reports in bf16, and in fp16 with a loss scale that overflows twice."""
    return {flag: launch(1, ["--pipeline-schedule", "none", *FLAGS[flag]]).only for flag in FLAGS}


FLAGS = {
    "bf16": ["--bf16"],
    "fp16": ["--fp16", "--initial-loss-scale", str(2**22), "--hysteresis", "1"],
}


def test_bf16_trains_close_to_fp32_on_one_process(references, half_precision_references):
    """bf16 (Float16Module + megatron's fp32 main-param optimizer) tracks the fp32 run."""
    bf16, fp32 = losses(half_precision_references["bf16"]), losses(references[False][1].only)
    assert len(bf16) == len(fp32) == 5
    assert bf16 == pytest.approx(fp32, rel=1e-2)
    assert bf16 != fp32  # bf16 really ran: its rounding shows in the losses


def test_bf16_at_pp4_tracks_the_bf16_single_process_run_for_v_and_bidirectional(
    half_precision_references,
):
    """Casts follow each chunk's own pre/post process: rank 3 of bitpipe holds middle stages."""
    schedules = ["bitpipe", "v-half", "chimera"]
    trained = launch(4, ["--pipeline-model-parallel-size", "4", "--bf16", "--pipeline-schedule", ",".join(schedules)])
    expected = losses(half_precision_references["bf16"])
    assert list(trained.schedules) == schedules
    for schedule, entry in trained.schedules.items():
        assert losses(entry) == pytest.approx(expected, rel=1e-2), schedule
        assert entry["replicas_identical"] or schedule == "v-half"


def test_fp16_skips_the_same_iterations_as_one_process_on_both_replicas(half_precision_references):
    """Dynamic loss scaling: overflowing steps are skipped on every rank alike (the replicas
    stay bitwise identical) and the scale falls as on one process."""
    reference = half_precision_references["fp16"]
    skipped = values(reference, "skipped")
    assert skipped[:3] == [True, True, False]  # the test sees skips and updates
    trained = launch(4, ["--pipeline-model-parallel-size", "4", *FLAGS["fp16"], "--pipeline-schedule", "bitpipe,chimera"])
    assert list(trained.schedules) == ["bitpipe", "chimera"]
    for schedule, entry in trained.schedules.items():
        assert values(entry, "skipped") == skipped, schedule
        assert values(entry, "loss_scale") == values(reference, "loss_scale"), schedule
        assert losses(entry) == pytest.approx(losses(reference), rel=1e-4), schedule
        assert entry["replicas_identical"], schedule


def test_clipping_counts_each_stage_once_with_two_replicas(tmp_path):
    """--clip-grad 0.05 clips every step (the norm is ~1.5): the plain optimizer sees both
    replicas in its norm group, the distributed one shards each stage over the replica pair."""
    clip = ["--clip-grad", "0.05"]
    reference = launch(1, ["--pipeline-schedule", "none", *clip]).only
    assert min(grad_norms(reference)) > 0.05
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
    for layout, trained in runs.items():
        for schedule, entry in trained.schedules.items():
            assert grad_norms(entry) == pytest.approx(grad_norms(reference), rel=1e-5), (layout, schedule)
            assert losses(entry) == pytest.approx(losses(reference), rel=1e-5), (layout, schedule)


def test_steps_make_no_host_sync_and_hold_megatrons_memory():
    """From iteration 2 the forward-backward step makes none of the calls that wait for a GPU;
    on the same order, each rank's peak memory is megatron's own, plus on gloo the sends not yet
    known complete (gloo reports a send complete only once waited on)."""
    schedules = [
        "1f1b", "megatron-1f1b", "interleaved-1f1b", "megatron-interleaved", "bitpipe", "chimera", "v-zb",
    ]
    trained = launch(
        4,
        [
            "--pipeline-model-parallel-size", "4", "--virtual-pipeline-model-parallel-size", "2",
            "--check-host-syncs", "--measure-memory", "--pipeline-schedule", ",".join(schedules),
        ],
    )
    entries = trained.schedules
    assert list(entries) == schedules
    for schedule, entry in entries.items():
        assert entry["host_syncs"] == 0, schedule
    for ours, theirs in (("1f1b", "megatron-1f1b"), ("interleaved-1f1b", "megatron-interleaved")):
        peak, held = entries[ours]["peak_memory_bytes"], entries[ours]["held_send_bytes"]
        reference = entries[theirs]["peak_memory_bytes"]
        for rank in range(4):
            assert 0.95 * reference[rank] <= peak[rank] <= reference[rank] + held[rank], (ours, rank)


def test_bf16_and_fp16_exclude_each_other_before_any_process_group():
    from megatron_bitpipe.run_plan import ArgumentsError, validate_args
    from megatron_bitpipe.train_args import build_parser

    args = build_parser().parse_args([*MODEL, "--pipeline-model-parallel-size", "2", "--bf16", "--fp16"])
    with pytest.raises(ArgumentsError, match="--bf16 and --fp16 exclude each other"):
        validate_args(args, world_size=2)
