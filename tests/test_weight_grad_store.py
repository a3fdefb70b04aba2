"""The split backward (I, then W from the weight-gradient store) gives megatron's gradients."""

from __future__ import annotations

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import split_check  # noqa: E402
from megatron_bitpipe.mcore import local_world  # noqa: E402
from megatron_bitpipe.mcore.weight_grad_store import STORE, WeightGradStore  # noqa: E402
from runs import REPO, run, succeeded  # noqa: E402

BOUND = 1e-6


@pytest.fixture(scope="module")
def megatron_world():
    if dist.is_initialized():
        pytest.skip("a process group exists already in this test process")
    local_world.init_single_process()
    yield
    local_world.close()


@pytest.mark.parametrize("fusion", [False, True], ids=["unfused", "gradient-accumulation-fusion"])
@pytest.mark.parametrize("overlap", [False, True], ids=["no-overlap", "overlap-grad-reduce"])
def test_split_gradients_equal_the_fused_backward(megatron_world, fusion, overlap):
    assert split_check.compare(fusion=fusion, overlap=overlap) <= BOUND


def test_split_gradients_equal_the_fused_backward_under_full_recompute(megatron_world):
    assert split_check.compare(recompute=True) <= BOUND


def test_an_i_leaves_linear_weight_gradients_for_its_w(megatron_world):
    model = split_check.build(sequence_parallel=False, fusion=False, recompute=False, overlap=True)
    (inputs, output_grad), = split_check.microbatches(1)
    model.zero_grad_buffer()
    with model.no_sync(), STORE.deferring("m0"):
        model(inputs.requires_grad_(), attention_mask=None).backward(output_grad)
    fc1 = model.module.layers[0].mlp.linear_fc1
    norm = model.module.layers[0].self_attention.linear_qkv
    assert torch.count_nonzero(fc1.weight.main_grad) == 0
    assert torch.count_nonzero(fc1.bias.main_grad) > 0  # biases take theirs in I
    assert STORE.pending() == ["m0"]
    assert STORE.flush("m0") == 2 * 4  # qkv, proj, fc1, fc2 in each of the two layers
    assert torch.count_nonzero(fc1.weight.main_grad) > 0 and torch.count_nonzero(norm.weight.main_grad) > 0
    assert STORE.pending() == []


def test_backwards_outside_a_deferral_run_whole(megatron_world):
    model = split_check.build(sequence_parallel=False, fusion=False, recompute=False, overlap=False)
    (inputs, output_grad), = split_check.microbatches(1)
    model.zero_grad_buffer()
    with model.no_sync():
        model(inputs.requires_grad_(), attention_mask=None).backward(output_grad)
    assert STORE.pending() == []
    assert torch.count_nonzero(model.module.layers[0].mlp.linear_fc1.weight.main_grad) > 0


def test_a_zero_out_wgrad_weight_gets_a_zero_placeholder_from_i(megatron_world):
    """DDP's hook adds such a weight's gradient to main_grad whatever grad_added_to_main_grad says."""
    model = split_check.build(sequence_parallel=False, fusion=False, recompute=False, overlap=False)
    fc1 = model.module.layers[0].mlp.linear_fc1
    fc1.weight.zero_out_wgrad = True
    (inputs, output_grad), = split_check.microbatches(1)
    model.zero_grad_buffer()
    with model.no_sync(), STORE.deferring("m0"):
        model(inputs.requires_grad_(), attention_mask=None).backward(output_grad)
    assert torch.count_nonzero(fc1.weight.main_grad) == 0
    STORE.discard()


def test_deferrals_do_not_nest():
    store = WeightGradStore()
    with store.deferring("a"), pytest.raises(RuntimeError, match="deferred inside those of a"):
        with store.deferring("b"):
            pass


def test_split_gradients_equal_the_fused_backward_at_tp2_with_sequence_parallel():
    """Two tensor-parallel ranks under torchrun, with and without gradient accumulation fusion."""
    result = run(2, [str(REPO / "tests" / "split_tp_check.py")], pythonpath=[str(REPO / "tests")])
    log = succeeded(result)
    assert log.count("split vs fused") == 2, log[-2000:]
