"""Checkpoints move between schedules: an ordinary GPT's keys, one copy of each layer.

Our trainer's ``--save`` / ``--load`` (megatron-core distributed checkpointing, Megatron-LM's
folder layout) on CPU/gloo: train 2 iterations with one schedule and layout, save, load with
another and train 2 more; the losses equal 4 uninterrupted iterations on one process to 1e-5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from runs import logged_losses, run, succeeded

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

MODEL = (
    "--num-layers 16 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
    "--micro-batch-size 2 --global-batch-size 16 --train-iters 4 --lr 1e-4 --adam-eps 1e-6 "
    "--seed 1234"
).split()


def train(processes: int, *arguments: str) -> str:
    return succeeded(run(processes, ["-m", "megatron_bitpipe.train", *MODEL, *arguments]))


def saved_keys(folder: Path) -> dict[str, tuple[int, ...] | None]:
    """Every key stored in a distributed checkpoint folder, with its global shape."""
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {key: tuple(getattr(value, "size", ())) or None for key, value in stored.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[float], dict[str, tuple[int, ...] | None]]:
    """Four iterations on one process, saved at the end: (losses, checkpoint keys)."""
    folder = tmp_path_factory.mktemp("reference")
    log = train(1, "--pipeline-schedule", "none", "--save", str(folder))
    return logged_losses(log), saved_keys(folder / "iter_0000004")


@pytest.mark.parametrize(
    "first,second",
    [
        (("4", "bitpipe"), ("2", "1f1b")),
        (("2", "1f1b"), ("4", "chimera")),
        (("2", "bitpipe", 4), ("2", "v-half", 4)),
    ],
    ids=["bitpipe-pp4-to-1f1b-pp2", "1f1b-pp2-to-chimera-pp4", "bitpipe-dp2-to-v-half-dp2"],
)
def test_training_resumes_under_another_schedule_as_if_uninterrupted(
    uninterrupted, tmp_path, first, second
):
    """At data parallel 2 the save is fully parallel (Megatron-LM's default), where a rank holding
    two copies of a shard (a replica, a locally tied head) once claimed it twice."""
    losses, reference_keys = uninterrupted
    pp_before, before, *world_before = first
    pp_after, after, *world_after = second
    folder = tmp_path / "checkpoints"
    log = train(
        (world_before or [int(pp_before)])[0],
        "--pipeline-model-parallel-size", pp_before, "--pipeline-schedule", before,
        "--train-iters", "2", "--save", str(folder),
    )
    assert (folder / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert saved_keys(folder / "iter_0000002") == reference_keys, "keys and shapes of one GPT"
    resumed = train(
        (world_after or [int(pp_after)])[0],
        "--pipeline-model-parallel-size", pp_after, "--pipeline-schedule", after,
        "--load", str(folder),
    )
    assert "loaded checkpoint from" in resumed
    assert logged_losses(log) + logged_losses(resumed) == pytest.approx(losses, rel=1e-5)


def test_a_checkpoint_holds_one_copy_of_each_layer_and_no_separate_tied_head(uninterrupted):
    _, keys = uninterrupted
    assert keys["embedding.word_embeddings.weight"] == (64, 32)
    assert "output_layer.weight" not in keys  # tied: stored as the embedding, as megatron does
    # megatron stacks the layers of a block along a leading axis: all 16, once
    assert keys["decoder.layers.mlp.linear_fc1.weight"] == (16, 128, 32)
    assert keys["optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight"] == (16, 128, 32)


def test_a_rank_with_two_copies_of_a_shard_writes_one():
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_bitpipe.mcore.checkpointing import _copy_mark, _one_main_copy_per_shard

    weight = torch.zeros(4, 2)

    def shard(key, replica_id):
        return ShardedTensor.from_rank_offsets(key, weight, replica_id=replica_id)

    embedding, head, other = shard("embedding", (0, 0, 1)), shard("embedding", (1, 0, 1)), shard("layer", (0, 0, 1))
    marks = [_copy_mark(item.replica_id) for item in (head, embedding, other)]
    for item in (head, embedding, other):
        item.replica_id = 0  # what the fully-parallel distribution does on the rank chosen to write
    _one_main_copy_per_shard([head, embedding, other], marks)
    assert (embedding.replica_id, head.replica_id, other.replica_id) == (0, 1, 0)


def test_loading_a_folder_without_a_finished_checkpoint_names_it(tmp_path):
    from megatron_bitpipe.mcore.checkpointing import latest_iteration

    (tmp_path / "iter_0000002").mkdir()  # written, but the tracker never was: not complete
    assert latest_iteration(str(tmp_path)) is None


def test_distributed_optimizer_checkpoints_need_a_fused_adam_and_say_so(monkeypatch):
    from megatron_bitpipe import run_plan
    from megatron_bitpipe.run_plan import ArgumentsError, validate_args
    from megatron_bitpipe.train_args import build_parser

    monkeypatch.setattr(run_plan, "_has_fused_adam", lambda: False)
    args = build_parser().parse_args(
        [*MODEL, "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--save", "x"]
    )
    with pytest.raises(ArgumentsError, match="--save/--load with --use-distributed-optimizer needs apex"):
        validate_args(args, world_size=4)
    monkeypatch.setattr(run_plan, "_has_fused_adam", lambda: True)
    assert validate_args(args, world_size=4)[0].schedule == "1f1b"
    assert isinstance(args, argparse.Namespace)


def test_checkpoints_without_psutil_are_refused_before_they_could_hang(monkeypatch):
    from megatron_bitpipe import run_plan
    from megatron_bitpipe.run_plan import ArgumentsError, validate_args
    from megatron_bitpipe.train_args import build_parser

    monkeypatch.setattr(run_plan, "_importable", lambda module: module != "psutil")
    args = build_parser().parse_args([*MODEL, "--load", "somewhere"])
    with pytest.raises(ArgumentsError, match="--save/--load need psutil"):
        validate_args(args, world_size=1)


@pytest.mark.parametrize(
    "kind,expected",
    [("bitpipe", {0: 0, 3: 0, 1: 2, 2: 2}), ("vshape", {0: 99, 1: 99, 2: 99, 3: 99})],
)
def test_replica_pairs_key_their_distributed_optimizer_buckets_alike(monkeypatch, kind, expected):
    """Megatron keys a distributed optimizer's checkpoint buckets by the rank's model-parallel
    index; the two ranks of a replica pair shard one state over the pair, so they share the pair's
    index (lower pipeline rank x TP + TP rank, here TP=2 at TP rank 0) and shard over the buffers'
    group. One pipeline keeps megatron's."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from megatron_bitpipe.mcore import checkpointing
    from megatron_bitpipe.schedules import placement

    layout = getattr(placement, kind)(4)
    pair_group = object()
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
    found = {}
    for pp_rank in range(4):
        monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda: pp_rank)
        inner = SimpleNamespace(
            data_parallel_group_idx=99,
            data_parallel_group="data parallel",
            buffers=[SimpleNamespace(data_parallel_group=pair_group)] * 2,
        )
        checkpointing.share_optimizer_keys_with_replicas(SimpleNamespace(chained_optimizers=[inner]), layout)
        found[pp_rank] = inner.data_parallel_group_idx
        sharded_over_pair = inner.data_parallel_group is pair_group
        assert sharded_over_pair == (kind == "bitpipe")
    assert found == expected
