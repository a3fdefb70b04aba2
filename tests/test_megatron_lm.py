"""Megatron-LM's own pretrain_gpt.py with --pipeline-schedule (megatron_bitpipe.megatron_lm).

The first part needs no Megatron-LM checkout and runs in CI: argument handling, the hooks'
contracts, the patches. The second part runs Megatron-LM's pretrain_gpt.py from the checkout at
``MEGATRON_LM_PATH`` (a tag of core_v0.16 to core_v0.19, with the megatron-core of the same
release) on CPU/gloo, ``--mock-data``, a tiny GPT, and skips, saying so, where that variable is
unset or names another release. Every run's printed ``lm loss``
and ``grad norm`` must equal the PP=1 run of the launcher (``1f1b`` at PP=1, which builds the
model with the same layout-independent initialization).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from runs import REPO, logged_grad_norms, logged_losses, run, succeeded

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron_bitpipe.megatron_lm import arguments, cpu, hooks, launcher  # noqa: E402
from megatron_bitpipe.run_plan import ArgumentsError  # noqa: E402
from megatron_bitpipe.schedules.placement import bitpipe, looped, vshape  # noqa: E402

PATCHES = sorted((REPO / "patches").glob("*.patch"))
SIZES = (
    "--num-layers 8 --hidden-size 64 --num-attention-heads 4 --seq-length 64 "
    "--micro-batch-size 2 --global-batch-size 16"
).split()


# --- no checkout needed ---------------------------------------------------------------------------


def plan(*extra: str, world_size: int = 4):
    return arguments.plan([*SIZES, *extra], world_size)


def test_our_options_join_megatron_lms_parser_as_an_extra_args_provider():
    parser = arguments.add_arguments(argparse.ArgumentParser())
    parsed = parser.parse_args(["--pipeline-schedule", "bitpipe", "--max-inflight", "3"])
    assert (parsed.pipeline_schedule, parsed.max_inflight) == ("bitpipe", 3)


@pytest.mark.parametrize("schedule", ["bitpipe", "v-half", "v-zb", "bitpipe-official"])
def test_placements_with_two_stages_per_rank_get_megatrons_virtual_stage_count(schedule):
    run_plan, argv = plan("--pipeline-model-parallel-size", "4", "--pipeline-schedule", schedule)
    assert argv[-2:] == ["--num-virtual-stages-per-pipeline-rank", "2"]
    assert run_plan.schedule == schedule and run_plan.num_microbatches == 8


@pytest.mark.parametrize("schedule", ["1f1b", "chimera", "zb-h1", "megatron-1f1b"])
def test_one_stage_per_rank_placements_keep_the_command_line(schedule):
    extra = ["--pipeline-model-parallel-size", "4", "--pipeline-schedule", schedule]
    _, argv = plan(*extra)
    assert argv == [*SIZES, *extra]


def test_interleaved_schedules_take_the_users_virtual_size():
    run_plan, argv = plan(
        "--pipeline-model-parallel-size", "4", "--num-virtual-stages-per-pipeline-rank", "2",
        "--pipeline-schedule", "interleaved-1f1b",
    )
    assert dict(run_plan.schedule_options) == {"vp": 2}
    assert argv.count("--num-virtual-stages-per-pipeline-rank") == 1


@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "breadth-first"])
def test_interleaved_schedules_without_a_virtual_size_tell_megatron_their_default(schedule):
    run_plan, argv = plan("--pipeline-model-parallel-size", "4", "--pipeline-schedule", schedule)
    assert run_plan.placement.chunks_per_rank == 2
    assert argv[-2:] == ["--num-virtual-stages-per-pipeline-rank", "2"]


def test_bitpipe_memory_option_reaches_the_schedule():
    run_plan, _ = plan("--pipeline-model-parallel-size", "4", "--pipeline-schedule", "bitpipe",
                       "--max-inflight", "6")
    assert dict(run_plan.schedule_options) == {"max_inflight": 6}


@pytest.mark.parametrize(
    "extra,world_size,message",
    [
        ([], 4, "--pipeline-schedule is required"),
        (["--pipeline-schedule", "bitpipe", "--pipeline-model-parallel-size", "3"], 3,
         "must be even"),
        (["--pipeline-schedule", "v-half", "--pipeline-model-parallel-size", "4",
          "--num-virtual-stages-per-pipeline-rank", "4"], 4,
         "--num-virtual-stages-per-pipeline-rank 4: --pipeline-schedule v-half places 2 stages"),
        (["--pipeline-schedule", "chimera", "--pipeline-model-parallel-size", "4",
          "--num-virtual-stages-per-pipeline-rank", "2"], 4, "places one stage of the pipeline"),
        (["--pipeline-schedule", "v-half"], 1, "Megatron-LM allows virtual stages only with"),
        (["--pipeline-schedule", "bitpipe", "--pipeline-model-parallel-size", "4",
          "--pipeline-model-parallel-layout", "Et|t|t|tL"], 4,
         "--pipeline-model-parallel-layout cannot be used"),
        (["--pipeline-schedule", "megatron-interleaved", "--pipeline-model-parallel-size", "4"], 4,
         "megatron-interleaved needs"),
        (["--pipeline-schedule", "chimera", "--pipeline-model-parallel-size", "4",
          "--max-inflight", "2"], 4, "--max-inflight is not an option of --pipeline-schedule chimera"),
        (["--pipeline-schedule", "bitpipe", "--pipeline-model-parallel-size", "4",
          "--num-layers", "12"], 4, "--num-layers 12 must be divisible by the 8 stages"),
        (["--pipeline-schedule", "none"], 1, "give one schedule"),
        (["--pipeline-schedule", "chimera", "--pipeline-model-parallel-size", "4",
          "--num-experts", "4"], 4,
         "--num-experts 4: --pipeline-schedule chimera runs two pipeline replicas"),
        (["--pipeline-schedule", "v-half", "--pipeline-model-parallel-size", "4",
          "--calculate-per-token-loss"], 4,
         "--calculate-per-token-loss: --pipeline-schedule v-half computes the loss on pipeline "
         "ranks"),
    ],
)
def test_bad_settings_are_one_error_naming_the_setting(extra, world_size, message):
    with pytest.raises(ArgumentsError, match=message.replace("(", r"\(")):
        arguments.plan([*SIZES, *extra], world_size)


def test_launcher_stops_before_anything_starts_with_one_line_and_status_2(tmp_path):
    script = tmp_path / "pretrain_gpt.py"
    script.write_text("raise SystemExit('must not run')\n")
    result = run(1, ["-m", "megatron_bitpipe.megatron_lm", str(script), *SIZES,
                     "--pipeline-schedule", "bitpipe", "--pipeline-model-parallel-size", "3"],
                 env={"WORLD_SIZE": "3"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "megatron_bitpipe: error: bitpipe: --pipeline-model-parallel-size 3 must be even and >= 2: "
        "the two pipelines pair rank r with rank D-1-r, which hold the same stages (the global "
        "batch gives 8 microbatches per data-parallel rank)"
    ]


def test_launcher_without_pretrain_gpt_prints_its_usage():
    result = run(1, ["-m", "megatron_bitpipe.megatron_lm", "--pipeline-schedule", "bitpipe"])
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m megatron_bitpipe.megatron_lm")


@pytest.mark.parametrize(
    "placement,tied,expected",
    [
        (looped(4), True, [10, 13]),  # megatron's own: embedding and head on the end ranks
        (looped(4), False, [10]),
        (vshape(4), True, [10]),  # the V ties inside rank 0
        (bitpipe(4), True, [10]),  # each replica ties inside its own end rank
        (looped(1), True, [10]),
    ],
)
def test_embedding_group_follows_where_the_tie_lives(placement, tied, expected):
    pp_ranks = [10, 11, 12, 13][: placement.num_ranks]
    assert hooks.embedding_ranks(placement, tied, pp_ranks) == expected


def test_the_chunks_holding_a_first_or_last_stage_load_the_data(monkeypatch):
    from megatron.core import parallel_state

    layout = bitpipe(4)  # rank 0: down 0 (first), up 11, down 7 (last), up 12
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda: 0)
    assert [hooks.holds_first_or_last_stage(layout, chunk) for chunk in range(4)] == [
        True, False, True, False,
    ]
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda: 3)
    assert [hooks.holds_first_or_last_stage(layout, chunk) for chunk in range(4)] == [
        False, True, False, True,
    ]
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda: 1)
    assert hooks.holds_first_or_last_stage(layout, None) is False


def test_the_optimizer_gets_both_replicas_chunks_in_stage_order(monkeypatch):
    from megatron_bitpipe.mcore import checkpointing

    monkeypatch.setattr(checkpointing, "share_optimizer_keys_with_replicas", lambda *args: None)
    layout = bitpipe(4)
    orders = []
    for rank in (1, 2):  # replica partners
        received: list = []
        ordered = hooks._in_stage_order(lambda config, chunks: received.extend(chunks), layout)
        ordered(None, [SimpleNamespace(bitpipe_stage=stage) for stage in layout.rank_stages[rank]])
        orders.append([layout.position(chunk.bitpipe_stage) for chunk in received])
    assert orders == [[1, 2, 5, 6], [1, 2, 5, 6]]


def test_tensor_parallel_batches_broadcast_every_field():
    calls = []
    broadcast = hooks._broadcast_every_field(lambda iterator, mtp_on_this_rank: calls.append(mtp_on_this_rank))
    broadcast(iter([]))
    assert calls == [True]


def test_megatron_lms_own_extra_args_provider_still_runs():
    parser = argparse.ArgumentParser()
    theirs = []
    chained = hooks._chained(arguments.add_arguments, lambda p: theirs.append(p) or p)
    assert chained(parser) is parser and theirs == [parser]
    assert parser.parse_args(["--pipeline-schedule", "1f1b"]).pipeline_schedule == "1f1b"


@pytest.mark.parametrize("version", [(0, 16, 1), (0, 17, 1), (0, 18, 2), (0, 19, 2)])
def test_hooks_take_the_releases_they_were_checked_against(monkeypatch, version):
    monkeypatch.setattr(hooks, "installed_version", lambda: version)
    assert hooks.release().tags.startswith(f"core_v{version[0]}.{version[1]}.")


@pytest.mark.parametrize("version", [(0, 15, 3), (0, 20, 0)])
def test_hooks_refuse_other_releases_naming_the_supported_range(monkeypatch, version):
    monkeypatch.setattr(hooks, "installed_version", lambda: version)
    found = ".".join(map(str, version))
    with pytest.raises(hooks.UnsupportedMegatronLM, match=f"megatron-core {found}: .* core_v0.16.x to core_v0.19.x"):
        hooks.check_version()


def fake_checkout(root: Path, *, parses_arguments: bool, builder: bool) -> Path:
    """A pretrain_gpt.py and megatron/training as a release lays them out (nothing importable)."""
    (root / "megatron" / "training" / "models").mkdir(parents=True)
    if builder:
        (root / "megatron" / "training" / "models" / "gpt.py").write_text("")
    script = root / "pretrain_gpt.py"
    script.write_text("args = parse_and_validate_args()\n" if parses_arguments else "pretrain()\n")
    return script


@pytest.mark.parametrize(
    "parses_arguments,builder,release",
    [(False, False, "core_v0.16-0.17"), (True, False, "core_v0.18"), (True, True, "core_v0.19")],
)
def test_a_script_of_another_release_than_megatron_core_is_refused_in_one_line(
    monkeypatch, tmp_path, parses_arguments, builder, release
):
    script = fake_checkout(tmp_path, parses_arguments=parses_arguments, builder=builder)
    monkeypatch.syspath_prepend(str(tmp_path))
    layout = (parses_arguments, builder)
    other = next(v for v, r in [((0, 16, 1), (False, False)), ((0, 19, 2), (True, True))] if r != layout)
    monkeypatch.setattr(hooks, "installed_version", lambda: other)
    with pytest.raises(hooks.UnsupportedMegatronLM, match=f"is a Megatron-LM {release} script, but megatron-core"):
        hooks.check_version(str(script))
    matching = next(v for v, r in hooks.RELEASES.items() if (r.script_parses_arguments, r.model_builder) == layout)
    monkeypatch.setattr(hooks, "installed_version", lambda: (*matching, 0))
    hooks.check_version(str(script))


@pytest.mark.parametrize("patch", PATCHES, ids=[patch.name for patch in PATCHES])
def test_each_patch_only_imports_megatron_bitpipe_and_calls_enable(patch):
    text = patch.read_text()
    header = text.split("diff --git", 1)[0]
    for field in ("Why:", "Targets: Megatron-LM tag core_v", "Test: tests/test_megatron_lm.py"):
        assert field in header, field
    added = [line[1:] for line in text.splitlines() if line.startswith("+") and not line.startswith("+++")]
    code = [line.split("#")[0].strip() for line in added if line.strip()]
    assert code == ["import megatron_bitpipe.megatron_lm", "megatron_bitpipe.megatron_lm.enable()"]
    assert not [line for line in text.splitlines() if line.startswith("-") and not line.startswith("---")]


def test_up_replicas_and_tied_heads_are_stored_as_copies():
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megatron_bitpipe.mcore.checkpointing import _as_replica

    tensor = ShardedTensor.from_rank_offsets("decoder.layers.x", torch.zeros(2), replica_id=(0, 0, 1))
    piece = ShardedObject("decoder.layers.y", None, (1,), (0,), replica_id=0)
    assert _as_replica(tensor).replica_id == (2, 0, 1)
    assert _as_replica(piece).replica_id == 2
    assert _as_replica("not sharded") == "not sharded"


# --- with a Megatron-LM checkout ------------------------------------------------------------------

CHECKOUT = os.environ.get("MEGATRON_LM_PATH")


def checkout_problem() -> str | None:
    """Why the checkout tests cannot run here, or None."""
    if not CHECKOUT:
        return (
            "MEGATRON_LM_PATH is unset: point it at a Megatron-LM checkout (a tag of core_v0.16 "
            "to core_v0.19, the release of the installed megatron-core) to run pretrain_gpt.py "
            "with our schedules"
        )
    try:
        hooks.check_version(f"{CHECKOUT}/pretrain_gpt.py", training=f"{CHECKOUT}/megatron/training")
    except hooks.UnsupportedMegatronLM as error:
        return f"MEGATRON_LM_PATH: {error}"
    return None


needs_checkout = pytest.mark.skipif(checkout_problem() is not None, reason=str(checkout_problem()))


def release_patch() -> Path:
    """The patch for the installed release's tag, or skip."""
    tags = hooks.release().tags
    for patch in PATCHES:
        if f"Targets: Megatron-LM tag {tags} " in patch.read_text():
            return patch
    pytest.skip(f"no patch under patches/ targets {tags}")
# Megatron-LM pads the vocabulary to a multiple of make-vocab-size-divisible-by x TP: core_v0.18+
# pads --vocab-size, older releases the tokenizer's (one more, for its end-of-document token).
# 127 and 64 give 128 rows at TP 1 and 2 in every release, so TP=2 runs match the PP=1 run.
TINY = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 127 --make-vocab-size-divisible-by 64 "
    "--num-layers 8 --hidden-size 64 "
    "--num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 "
    "--global-batch-size 16 --train-iters 4 --lr 1e-4 --log-interval 1 --eval-iters 0 "
    "--eval-interval 100 --hidden-dropout 0 --attention-dropout 0 --seed 1234"
).split()


def pretrain_gpt(processes: int, *extra: str, script: str | None = None) -> str:
    """Megatron-LM's pretrain_gpt.py through our launcher, which finds ``megatron.training`` in
    the script's checkout with no PYTHONPATH (or a patched copy run directly, with the checkout
    on PYTHONPATH for the copy's imports)."""
    assert CHECKOUT is not None
    if script is None:
        target, path = ["-m", "megatron_bitpipe.megatron_lm", f"{CHECKOUT}/pretrain_gpt.py"], []
    else:
        target, path = [script], [CHECKOUT]
    return succeeded(
        run(processes, [*target, *TINY, *extra], pythonpath=path, timeout=600, torchrun=True)
    )


def true_losses(log: str) -> list[float]:
    """The loss of each iteration. Megatron-LM prints a run's first iteration without resetting
    its sums (training.py:1797, ``should_reset = not is_first_iteration``), so the second line
    it prints is the mean of the first two iterations: undone here."""
    printed = logged_losses(log)
    if len(printed) >= 2:
        printed[1] = 2 * printed[1] - printed[0]
    return printed


@pytest.fixture(scope="module")
def reference() -> str:
    """PP=1 through the launcher: 1f1b builds the model with our initialization."""
    return pretrain_gpt(1, "--pipeline-schedule", "1f1b")


LAYOUTS = {
    "bitpipe-pp2": (2, "--pipeline-model-parallel-size 2 --pipeline-schedule bitpipe"),
    "bitpipe-pp4-replica-pairs": (
        4,
        "--pipeline-model-parallel-size 4 --pipeline-schedule bitpipe "
        "--pipeline-rank-order replica-pairs",
    ),
    "v-half-pp4": (4, "--pipeline-model-parallel-size 4 --pipeline-schedule v-half"),
    "bitpipe-dp2-pp2": (4, "--pipeline-model-parallel-size 2 --pipeline-schedule bitpipe"),
    "bitpipe-tp2-pp2": (
        4,
        "--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2 --pipeline-schedule bitpipe",
    ),
    "megatron-interleaved-pp4-vp2": (
        4,
        "--pipeline-model-parallel-size 4 --num-virtual-stages-per-pipeline-rank 2 "
        "--pipeline-schedule megatron-interleaved",
    ),
    "interleaved-1f1b-pp4-its-default-vp": (
        4, "--pipeline-model-parallel-size 4 --pipeline-schedule interleaved-1f1b"
    ),
}


@needs_checkout
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pretrain_gpt_prints_the_losses_and_grad_norms_of_one_process(reference, layout):
    processes, extra = LAYOUTS[layout]
    log = pretrain_gpt(processes, *extra.split())
    assert logged_losses(log) == pytest.approx(logged_losses(reference), rel=1e-5)
    assert len(logged_losses(log)) == 4
    assert logged_grad_norms(log) == logged_grad_norms(reference)


@needs_checkout
@pytest.mark.parametrize(
    "first,second",
    [
        ("4 bitpipe", "2 megatron-1f1b"),
        ("2 megatron-1f1b", "4 bitpipe"),
        ("2 bitpipe 4", "2 v-half 4"),
    ],
    ids=["bitpipe-pp4-to-megatron-1f1b-pp2", "megatron-1f1b-pp2-to-bitpipe-pp4",
         "bitpipe-dp2-pp2-to-v-half-dp2-pp2"],
)
def test_checkpoints_move_between_bitpipe_and_megatrons_own_1f1b(reference, tmp_path, first, second):
    """"PP SCHEDULE [WORLD]"; at data parallel 2 Megatron-LM saves fully parallel (its default)."""
    folder = str(tmp_path / "checkpoints")
    pp_before, before, *world_before = first.split()
    pp_after, after, *world_after = second.split()
    saved = pretrain_gpt(
        int((world_before or [pp_before])[0]), "--pipeline-model-parallel-size", pp_before,
        "--pipeline-schedule", before, "--save", folder, "--save-interval", "2", "--exit-interval", "2",
    )
    resumed = pretrain_gpt(
        int((world_after or [pp_after])[0]), "--pipeline-model-parallel-size", pp_after,
        "--pipeline-schedule", after, "--load", folder,
    )
    assert "loading distributed checkpoint from" in resumed
    assert true_losses(saved) + true_losses(resumed) == pytest.approx(
        true_losses(reference), rel=1e-5
    )


@needs_checkout
def test_zero_bubble_schedules_run_with_megatron_lms_default_dropout_fusion():
    """Megatron-LM's defaults (dropout 0.1, bias-dropout-add fusion) through a schedule that runs
    autograd twice over each layer (I, then W). A study on this machine once saw it stop with
    'compiled with non-empty donated buffers'; the hooks turn torch's donated buffers off for such
    schedules. That failure does not reproduce here now, so this checks the configuration trains."""
    dropout_off = " --hidden-dropout 0 --attention-dropout 0"
    defaults = " ".join(TINY).replace(dropout_off, "").split()
    assert len(defaults) == len(TINY) - 4
    result = run(2, ["-m", "megatron_bitpipe.megatron_lm", f"{CHECKOUT}/pretrain_gpt.py", *defaults,
                     "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-h1"],
                 timeout=600)
    losses = logged_losses(succeeded(result))
    assert len(losses) == 4 and all(4.0 < loss < 7.0 for loss in losses)


@needs_checkout
def test_the_releases_patch_applies_to_the_checkout():
    patch = release_patch()
    result = subprocess.run(
        ["git", "apply", "--check", str(patch)], cwd=CHECKOUT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@needs_checkout
def test_patched_pretrain_gpt_trains_bitpipe_like_one_process(reference, tmp_path):
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py"):
        shutil.copy(Path(CHECKOUT) / name, tmp_path / name)
    applied = subprocess.run(
        ["git", "apply", str(release_patch())], cwd=tmp_path, capture_output=True, text=True
    )
    assert applied.returncode == 0, applied.stderr
    log = pretrain_gpt(
        2, "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "bitpipe",
        script=str(tmp_path / "pretrain_gpt.py"),
    )
    assert logged_losses(log) == pytest.approx(logged_losses(reference), rel=1e-5)


REFUSED_FEATURES = {
    "--num-experts 4": ("num_experts", 4, "--num-experts 4: --pipeline-schedule bitpipe runs two"),
    "--calculate-per-token-loss": (
        "calculate_per_token_loss", True,
        "--calculate-per-token-loss: --pipeline-schedule bitpipe computes the loss on pipeline "
        "ranks [0, 1]",
    ),
}


def megatron_lms_parser(monkeypatch) -> argparse.ArgumentParser:
    """Megatron-LM's own argument parser, imported from the checkout."""
    cpu.stub_triton_kernels()
    monkeypatch.syspath_prepend(CHECKOUT)
    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


@needs_checkout
def test_megatron_lm_reads_the_refused_features_under_the_names_the_launcher_checks(monkeypatch):
    parser = megatron_lms_parser(monkeypatch)
    for flags, (name, value, _) in REFUSED_FEATURES.items():
        assert getattr(parser.parse_known_args(flags.split())[0], name) == value
        assert getattr(arguments._preparser().parse_known_args(flags.split())[0], name) == value


@needs_checkout
def test_megatron_lm_has_no_flag_for_variable_sequence_lengths(monkeypatch):
    """Its validate_args sets variable_seq_lengths False: run_plan's rule is for other callers."""
    parser = megatron_lms_parser(monkeypatch)
    assert not any("variable-seq" in flag for flag in parser._option_string_actions)


@needs_checkout
def test_pretrain_gpt_with_a_refused_feature_stops_with_one_line_and_status_2(monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("pretrain_gpt.py must not run")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(launcher.runpy, "run_path", must_not_run)
    for flags, (_, _, message) in REFUSED_FEATURES.items():
        with pytest.raises(SystemExit) as stopped:
            launcher.main([f"{CHECKOUT}/pretrain_gpt.py", *TINY, "--pipeline-model-parallel-size",
                           "2", "--pipeline-schedule", "bitpipe", *flags.split()])
        assert stopped.value.code == 2, flags
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"megatron_bitpipe: error: {message}"), lines


def test_on_a_cpu_the_local_specs_torch_norm_takes_sequence_parallel():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cpu._allow_sequence_parallel_torch_norm()
    config = SimpleNamespace(sequence_parallel=True, normalization="RMSNorm")
    norm = WrappedTorchNorm(config, 8, 1e-6)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(param.sequence_parallel for param in norm.parameters())


def test_cpu_runs_turn_off_the_cuda_only_fusions_unless_the_user_chose():
    flags = dict(cpu.CPU_FLAGS)
    assert "--no-rope-fusion" in flags and "--no-masked-softmax-fusion" in flags


LLAMA = ("--position-embedding-type rope --normalization RMSNorm --swiglu "
         "--untie-embeddings-and-output-weights --disable-bias-linear").split()


@needs_checkout
def test_llama_style_flags_with_sequence_parallel_train_like_one_process():
    """RoPE, RMSNorm, SwiGLU, untied embeddings, no biases, TP=2 with sequence parallel: on a CPU
    the launcher turns off the fusions that need a GPU and lets the local spec's torch norm take
    sequence parallel, with nothing added to the command line."""
    one = pretrain_gpt(1, *LLAMA, "--pipeline-schedule", "1f1b")
    split = pretrain_gpt(4, *LLAMA, "--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                         "--sequence-parallel", "--pipeline-schedule", "bitpipe")
    assert len(logged_losses(one)) == 4
    assert logged_losses(split) == pytest.approx(logged_losses(one), rel=1e-5)
    assert logged_grad_norms(split) == pytest.approx(logged_grad_norms(one), rel=1e-3)


@needs_checkout
def test_megatron_lms_default_dropout_trains_like_one_process():
    """Dropout masks follow (seed, step, layer, microbatch) (``mcore.dropout``), so with
    Megatron-LM's default dropout of 0.1 a pipeline prints the single process's losses."""
    dropout_off = " --hidden-dropout 0 --attention-dropout 0"
    defaults = " ".join(TINY).replace(dropout_off, "").split()
    target = ["-m", "megatron_bitpipe.megatron_lm", f"{CHECKOUT}/pretrain_gpt.py", *defaults]
    one = succeeded(run(1, [*target, "--pipeline-schedule", "1f1b"], timeout=600, torchrun=True))
    two = succeeded(run(2, [*target, "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "bitpipe"],
                        timeout=600))
    assert len(logged_losses(one)) == 4
    assert logged_losses(two) == pytest.approx(logged_losses(one), rel=1e-5)


FEATURES = (
    "--position-embedding-type rope --normalization RMSNorm --swiglu "
    "--untie-embeddings-and-output-weights --disable-bias-linear --group-query-attention "
    "--num-query-groups 2 --recompute-granularity full --recompute-method uniform "
    "--recompute-num-layers 1 --bf16"
).split()


@needs_checkout
def test_llama_style_bf16_runs_with_data_parallel_checkpoints_train_like_one_process(tmp_path):
    """The feature matrix a user brings, in one group of runs: LLaMA-style layers (RoPE,
    RMSNorm, SwiGLU, GQA, untied embeddings, no biases), full recompute and bf16, at DP=2 x PP=2.
    BitPipe saves after two iterations (fully parallel, each shard once) and V-Half resumes;
    BitPipe with the distributed optimizer trains four iterations, saving after two (that save
    used to fail: the replica pair shards one optimizer state). All print the PP=1 losses.
    Resuming the distributed optimizer needs apex or Transformer Engine's Adam (megatron-core
    cannot describe torch Adam's empty state to load into), so no CPU run resumes it."""
    one = pretrain_gpt(1, *FEATURES, "--pipeline-schedule", "1f1b")
    bitpipe_dp2 = (*FEATURES, "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "bitpipe")
    plain, distributed = str(tmp_path / "plain"), str(tmp_path / "distributed")
    saved = pretrain_gpt(4, *bitpipe_dp2, "--save", plain, "--save-interval", "2", "--exit-interval", "2")
    resumed = pretrain_gpt(
        4, *FEATURES, "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "v-half",
        "--load", plain,
    )
    sharded = pretrain_gpt(
        4, *bitpipe_dp2, "--use-distributed-optimizer", "--save", distributed, "--save-interval", "2",
    )
    assert "loading distributed checkpoint from" in resumed
    assert len(true_losses(one)) == 4
    assert true_losses(saved) + true_losses(resumed) == pytest.approx(true_losses(one), rel=1e-5)
    assert logged_losses(sharded) == pytest.approx(logged_losses(one), rel=1e-5)
    assert (tmp_path / "distributed" / "iter_0000002" / "metadata.json").is_file()
