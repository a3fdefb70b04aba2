"""Which transformer-layer spec a chunk is built with.

Transformer Engine's spec when it is importable; otherwise megatron's local spec. The local spec's
torch norm refuses sequence parallelism (megatron only needs its parameters marked so that
finalize_model_grads sums their gradients over tensor parallel): with ``sequence_parallel`` the
norms are swapped for ``SequenceParallelTorchNorm``, which does exactly that.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

LayerSpec = ModuleSpec | TransformerBlockSubmodules
_TORCH_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class SequenceParallelTorchNorm:
    """A torch LayerNorm / RMSNorm whose parameters carry megatron's ``sequence_parallel`` mark."""

    def __new__(
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused: Any
    ) -> torch.nn.Module:
        if config.normalization not in _TORCH_NORMS:
            raise ValueError(
                f"normalization {config.normalization} has no torch implementation here"
            )
        norm = _TORCH_NORMS[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def layer_spec(config: TransformerConfig, layers_per_stage: int) -> LayerSpec:
    """The spec for one chunk of ``layers_per_stage`` layers under ``config``."""
    if transformer_engine_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec()
    if not config.sequence_parallel or spec.submodules.input_layernorm is not WrappedTorchNorm:
        return spec
    submodules = dataclasses.replace(
        spec.submodules,
        input_layernorm=SequenceParallelTorchNorm,
        pre_mlp_layernorm=SequenceParallelTorchNorm,
    )
    layer = dataclasses.replace(spec, submodules=submodules)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * layers_per_stage, layer_norm=SequenceParallelTorchNorm
    )
