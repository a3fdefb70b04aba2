"""Layout-independent dropout (``mcore.dropout``): masks follow (seed, step, layer, microbatch).

A layer's masks no longer depend on which rank or chunk runs it, or on what ran before, so a
pipeline with dropout on trains like one process.
"""

from __future__ import annotations

import pytest
from runs import train

from megatron_bitpipe.run_report import losses

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron_bitpipe.mcore import dropout  # noqa: E402

MODEL = (
    "--num-layers 8 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
    "--micro-batch-size 2 --global-batch-size 16 --train-iters 3 --lr 1e-3 --seed 1234 "
    "--hidden-dropout 0.2 --attention-dropout 0.2"
).split()


def test_stream_seeds_differ_by_step_layer_and_microbatch_and_repeat_exactly():
    base = dropout.stream_seed(1234, 1, 3, 5)
    assert base == dropout.stream_seed(1234, 1, 3, 5)
    others = {dropout.stream_seed(1234, 2, 3, 5), dropout.stream_seed(1234, 1, 4, 5),
              dropout.stream_seed(1234, 1, 3, 6), dropout.stream_seed(1235, 1, 3, 5)}
    assert base not in others and len(others) == 4


def test_a_layer_draws_the_same_masks_whatever_ran_before():
    from megatron_bitpipe.mcore.local_world import init_single_process

    init_single_process()
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_bitpipe.mcore.cpu import config_overrides
    from megatron_bitpipe.mcore.specs import layer_spec

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.5,
                               attention_dropout=0.5, **config_overrides())
    block = TransformerBlock(config, layer_spec(config, 2))
    dropout.install([block], seed=7)
    hidden = torch.randn(8, 2, 32)

    def forward(microbatch: int) -> torch.Tensor:
        with dropout.running(microbatch):
            return block(hidden, attention_mask=None)

    first = forward(3)
    torch.rand(1000)  # draws in between, as another chunk's work would make
    assert torch.equal(forward(3), first)
    assert not torch.equal(forward(4), first)
    dropout.next_step()
    assert not torch.equal(forward(3), first)


def test_pipelines_with_dropout_train_like_one_process():
    reference = losses(train(1, [*MODEL, "--pipeline-schedule", "1f1b"]).only)
    schedules = ["bitpipe", "v-half", "interleaved-1f1b"]
    pipelines = train(2, [*MODEL, "--pipeline-model-parallel-size", "2",
                          "--pipeline-schedule", ",".join(schedules)]).schedules
    assert len(reference) == 3
    assert list(pipelines) == schedules
    for schedule, entry in pipelines.items():
        assert losses(entry) == pytest.approx(reference, rel=1e-5), schedule
