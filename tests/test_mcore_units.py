"""In-process contracts of the megatron-core adapter's small parts (no process group)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron.core.transformer import TransformerConfig  # noqa: E402

from megatron_bitpipe.mcore.features import UnsupportedFeatureError, check_supported  # noqa: E402
from megatron_bitpipe.mcore.groups import parameter_checksums  # noqa: E402
from megatron_bitpipe.mcore.losses import LossLayout  # noqa: E402
from megatron_bitpipe.mcore.precision import StageFloat16Module  # noqa: E402
from megatron_bitpipe.schedules.placement import bitpipe as bitpipe_placement  # noqa: E402
from megatron_bitpipe.schedules.placement import looped  # noqa: E402

PLAIN = dict(
    gradient_accumulation_fusion=False,
    enable_cuda_graph=False,
    external_cuda_graph=False,
    cuda_graph_impl="none",
    cpu_offloading=False,
    fine_grained_activation_offloading=False,
)


@pytest.mark.parametrize(
    "setting,ddp,splits,named",
    [
        ({}, {"overlap_param_gather": True}, False, "overlap_param_gather"),
        ({"enable_cuda_graph": True}, {}, False, "CUDA graphs"),
        ({"cuda_graph_impl": "local"}, {}, False, "cuda_graph_impl='local'"),
        ({"cpu_offloading": True}, {}, False, "cpu_offloading"),
        ({"fine_grained_activation_offloading": True}, {}, False, "fine_grained_activation"),
        ({"calculate_per_token_loss": True}, {}, False, r"calculate_per_token_loss .* ranks \[0, 3\]"),
        ({"variable_seq_lengths": True}, {}, False, "variable_seq_lengths"),
        ({"defer_embedding_wgrad_compute": True}, {}, False, "defer_embedding_wgrad_compute"),
    ],
)
def test_unsupported_features_are_refused_by_name(setting, ddp, splits, named):
    config = SimpleNamespace(**{**PLAIN, **setting})
    placement = bitpipe_placement(4)
    with pytest.raises(UnsupportedFeatureError, match=f"^bitpipe: not supported .*{named}"):
        check_supported("bitpipe", config, [SimpleNamespace(**ddp)], splits, placement)


def test_gradient_accumulation_fusion_is_fine_with_a_split_backward():
    config = SimpleNamespace(**{**PLAIN, "gradient_accumulation_fusion": True})
    check_supported("zb-h1", config, [SimpleNamespace(overlap_param_gather=False)], True, looped(4, 1))


def test_transformer_engine_linears_are_refused_with_a_split_backward():
    with pytest.raises(UnsupportedFeatureError, match="cannot defer \\(decoder.layers.0.linear_fc1"):
        check_supported(
            "zb-h1", SimpleNamespace(**PLAIN), [], True, looped(4, 1), ["decoder.layers.0.linear_fc1"]
        )


def test_per_token_loss_is_fine_where_the_loss_is_on_the_last_rank_alone():
    config = SimpleNamespace(**{**PLAIN, "calculate_per_token_loss": True})
    check_supported("1f1b", config, [SimpleNamespace(overlap_param_gather=False)], False, looped(4, 1))


def test_checksums_see_a_one_ulp_change_and_nothing_else():
    module = torch.nn.Linear(64, 64)
    same = parameter_checksums(module)
    assert torch.equal(same, parameter_checksums(module))
    with torch.no_grad():
        weight = module.weight.view(-1)
        weight[1234] = torch.nextafter(weight[1234], torch.tensor(1.0))
    changed = parameter_checksums(module)
    assert (changed != same).any(dim=1).tolist() == [True, False]
    assert changed.shape == (2, 2) and changed.dtype == torch.int64


def test_checksums_of_bf16_parameters():
    module = torch.nn.Linear(8, 8).bfloat16()
    before = parameter_checksums(module)
    with torch.no_grad():
        module.bias[0] += 1
    assert (parameter_checksums(module) != before).any(dim=1).tolist() == [False, True]


def test_loss_layout_round_trips_a_loss_dict_through_one_row():
    item = {"lm loss": torch.tensor(2.5), "tokens": torch.tensor([3.0, 7.0]).bfloat16()}
    layout = LossLayout.of(item)
    assert layout is not None and layout.width == 3
    row = layout.flatten(item)
    assert row.dtype == torch.float64
    back = layout.unflatten(row)
    assert list(back) == ["lm loss", "tokens"]
    assert torch.equal(back["lm loss"], item["lm loss"]) and torch.equal(back["tokens"], item["tokens"])
    assert back["tokens"].dtype == torch.bfloat16


def test_loss_layout_refuses_values_that_are_not_tensors():
    assert LossLayout.of({"lm loss": 2.5}) is None
    assert LossLayout.of([torch.tensor(1.0)]) is None


class Chunk(torch.nn.Module):
    """Stands in for a GPTModel chunk: returns its input times a weight."""

    def __init__(self, pre_process: bool, post_process: bool) -> None:
        super().__init__()
        self.pre_process, self.post_process = pre_process, post_process
        self.weight = torch.nn.Parameter(torch.ones(4))

    def forward(self, hidden):
        return hidden * self.weight


def bf16_config() -> TransformerConfig:
    return TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, bf16=True, params_dtype=torch.bfloat16
    )


@pytest.mark.parametrize(
    "pre,post,input_dtype,output_dtype",
    [
        (True, False, torch.float32, torch.bfloat16),  # embedding chunk: casts its input
        (False, False, torch.bfloat16, torch.bfloat16),  # middle: sends bf16, as receivers expect
        (False, True, torch.bfloat16, torch.float32),  # head: the loss comes back in fp32
    ],
)
def test_half_precision_casts_follow_the_chunk_not_the_rank(pre, post, input_dtype, output_dtype):
    wrapped = StageFloat16Module(bf16_config(), Chunk(pre, post))
    output = wrapped(torch.ones(4, dtype=input_dtype))
    assert output.dtype == output_dtype
