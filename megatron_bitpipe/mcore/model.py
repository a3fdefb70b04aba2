"""A rank's GPT model chunks for any placement, with layout-independent initial weights.

Local chunk ``c`` of pipeline rank ``r`` holds global stage ``s = placement.rank_stages[r][c]``;
position ``p`` of ``s`` in its pipeline owns layers ``[p*L/S, (p+1)*L/S)`` (true global numbers,
so checkpoints and the oracle see Megatron's names), the embedding when ``p == 0`` and the head
when ``p == S-1``. Every parameter is drawn from a seed derived from its global name, as a full
tensor on the CPU, and the tensor-parallel shard is cut from it: every PP/TP/DP layout and
schedule, and both replicas of a bidirectional placement, start from identical weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_bitpipe.mcore import checkpointing, dropout, specs
from megatron_bitpipe.mcore.specs import LayerSpec
from megatron_bitpipe.schedules.placement import Placement

WORD_EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
_SCALED_INIT_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")
# Modules that bind the layer-count / layer-offset helpers at import time.
_LAYER_HELPER_SITES = (
    ("megatron.core.transformer.transformer_layer", "get_transformer_layer_offset"),
    ("megatron.core.transformer.transformer_block", "get_transformer_layer_offset"),
    ("megatron.core.transformer.transformer_block", "get_num_layers_to_build"),
    ("megatron.core.models.gpt.gpt_layer_specs", "get_transformer_layer_offset"),
    ("megatron.core.models.gpt.gpt_layer_specs", "get_num_layers_to_build"),
    ("megatron.core.transformer.multi_token_prediction", "get_transformer_layer_offset"),
)


@dataclass(frozen=True)
class StageLayout:
    """Which transformer layers each (pipeline rank, local chunk) holds."""

    placement: Placement
    num_layers: int

    def __post_init__(self) -> None:
        stages = self.placement.stages_per_pipeline
        if self.num_layers % stages:
            raise ValueError(
                f"--num-layers {self.num_layers} must be divisible by the {stages} stages per "
                f"pipeline of the {self.placement.kind} placement"
            )

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.placement.stages_per_pipeline

    def stage(self, pp_rank: int, chunk: int) -> int:
        return self.placement.rank_stages[pp_rank][chunk]

    def first_layer(self, pp_rank: int, chunk: int) -> int:
        """0-based global index of the chunk's first layer (Megatron's layer offset)."""
        return self.placement.position(self.stage(pp_rank, chunk)) * self.layers_per_stage

    def virtual_size(self) -> int | None:
        """The TransformerConfig ``virtual_pipeline_model_parallel_size`` for this layout."""
        per_rank = self.placement.stages_per_pipeline // self.placement.num_ranks
        return per_rank if per_rank > 1 else None

    def vp_stage(self, chunk: int) -> int | None:
        """The ``vp_stage`` Megatron sees for a chunk (None when a rank holds one chunk)."""
        return chunk if self.placement.chunks_per_rank > 1 else None


_ORIGINAL_HELPERS: dict[tuple[str, str], Callable[..., int]] = {}


def use_layout(layout: StageLayout) -> None:
    """Make megatron's layer-offset and layer-count helpers follow ``layout`` (process-wide)."""

    def layer_offset(config: Any, vp_stage: int | None = None, pp_rank: int | None = None) -> int:
        if pp_rank is None:
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        return layout.first_layer(pp_rank, vp_stage or 0)

    def layers_to_build(
        config: Any, vp_stage: int | None = None, pp_rank: int | None = None
    ) -> int:
        return layout.layers_per_stage

    replacements = {
        "get_transformer_layer_offset": layer_offset,
        "get_num_layers_to_build": layers_to_build,
    }
    for module_name, attribute in _LAYER_HELPER_SITES:
        module = _import_optional(module_name)
        if module is None or not hasattr(module, attribute):
            continue
        _ORIGINAL_HELPERS.setdefault((module_name, attribute), getattr(module, attribute))
        setattr(module, attribute, replacements[attribute])


def restore_layout_helpers() -> None:
    """Undo ``use_layout``."""
    for (module_name, attribute), original in _ORIGINAL_HELPERS.items():
        setattr(importlib.import_module(module_name), attribute, original)
    _ORIGINAL_HELPERS.clear()


def _import_optional(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def ties_locally(placement: Placement) -> bool:
    """True when every rank that holds an embedding also holds a head (V, Chimera, BitPipe)."""
    for stages in placement.rank_stages:
        has_embedding = any(placement.is_first(stage) for stage in stages)
        has_head = any(placement.is_last(stage) for stage in stages)
        if has_embedding != has_head:
            return False
    return placement.stages_per_pipeline > 1


ModelFactory = Callable[..., GPTModel]
"""``factory(pre_process=, post_process=, vp_stage=, share_embeddings_and_output_weights=)``: one
chunk's model, e.g. Megatron-LM's own model provider (``megatron_bitpipe.megatron_lm``)."""


def build_chunks(
    config: TransformerConfig,
    placement: Placement,
    *,
    share_embeddings_and_output_weights: bool,
    seed: int,
    vocab_size: int | None = None,
    max_sequence_length: int | None = None,
    layer_spec: LayerSpec | None = None,
    model_factory: ModelFactory | None = None,
) -> list[GPTModel]:
    """This rank's chunks (``model[c]`` holds stage ``rank_stages[pp_rank][c]``), initialised.

    Each chunk is a ``GPTModel`` of ``config`` (with ``vocab_size``, ``max_sequence_length`` and
    ``layer_spec``), or whatever ``model_factory`` builds. Shared embeddings are tied inside the
    rank when ``ties_locally(placement)`` (the head keeps its own copy, initialised to the
    embedding and kept equal by ``tie_embedding_grads``); otherwise megatron's embedding group
    does it. Checkpoints of the chunks have an ordinary GPT's keys (``checkpointing``).
    """
    layout = StageLayout(placement, config.num_layers)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    _check_config(config, layout)
    use_layout(layout)
    local_tie = share_embeddings_and_output_weights and ties_locally(placement)
    if model_factory is None:
        if vocab_size is None or max_sequence_length is None:
            raise ValueError("build_chunks needs vocab_size and max_sequence_length, or a model_factory")
        model_factory = functools.partial(
            GPTModel,
            config=config,
            transformer_layer_spec=layer_spec or specs.layer_spec(config, layout.layers_per_stage),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
        )
    chunks = []
    for chunk in range(placement.chunks_per_rank):
        stage = layout.stage(pp_rank, chunk)
        model = model_factory(
            pre_process=placement.is_first(stage),
            post_process=placement.is_last(stage),
            vp_stage=layout.vp_stage(chunk),
            share_embeddings_and_output_weights=share_embeddings_and_output_weights
            and not local_tie,
        )
        model.bitpipe_stage = stage
        model.bitpipe_ties_embedding = local_tie
        initialize_parameters(model, config, seed=seed, tied=share_embeddings_and_output_weights)
        checkpointing.follow_placement(model, placement, tied_locally=local_tie)
        chunks.append(model)
    if config.hidden_dropout > 0 or config.attention_dropout > 0:
        dropout.install(chunks, seed)
    for embedding, head in tied_embedding_pairs(chunks):
        # Own DDP buckets, so a distributed optimizer shards both copies the same way; the head
        # is a duplicate for the grad norm (megatron marks its own tied copy the same way).
        embedding.shared_embedding = head.shared_embedding = True
        head.shared = True
    return chunks


def _check_config(config: TransformerConfig, layout: StageLayout) -> None:
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if layout.placement.num_ranks != pp_size:
        raise ValueError(
            f"placement {layout.placement.kind} is for {layout.placement.num_ranks} pipeline "
            f"ranks but --pipeline-model-parallel-size is {pp_size}"
        )
    if config.virtual_pipeline_model_parallel_size != layout.virtual_size():
        raise ValueError(
            f"TransformerConfig.virtual_pipeline_model_parallel_size must be "
            f"{layout.virtual_size()} for the {layout.placement.kind} placement, got "
            f"{config.virtual_pipeline_model_parallel_size}"
        )


def global_parameter_names(model: GPTModel) -> dict[str, str]:
    """Local parameter name -> name in the unsplit model (global layer numbers)."""
    renames = {
        f"decoder.layers.{index}.": f"decoder.layers.{layer.layer_number - 1}."
        for index, layer in enumerate(model.decoder.layers)
    }
    names = {}
    for name, _ in model.named_parameters():
        global_name = name
        for local_prefix, global_prefix in renames.items():
            if name.startswith(local_prefix):
                global_name = global_prefix + name[len(local_prefix) :]
                break
        names[name] = global_name
    return names


@torch.no_grad()
def initialize_parameters(
    model: GPTModel, config: TransformerConfig, *, seed: int, tied: bool
) -> None:
    """Overwrite every parameter with values that depend only on (seed, global name).

    Megatron's default distributions: normal(0, init_method_std), scaled by 1/sqrt(2L) for the
    output projections; norms 1, biases 0. A tied head is drawn as the word embedding.
    """
    names = global_parameter_names(model)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for local_name, param in model.named_parameters():
        global_name = names[local_name]
        key = WORD_EMBEDDING if tied and global_name == OUTPUT_LAYER else global_name
        full = _full_initial_value(key, _full_shape(param, tp_size), config, seed)
        param.copy_(_tensor_parallel_shard(full, param, tp_size, tp_rank))


def _full_shape(param: torch.nn.Parameter, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def _full_initial_value(
    name: str, shape: tuple[int, ...], config: TransformerConfig, seed: int
) -> torch.Tensor:
    leaf = name.rsplit(".", 2)
    module_name, param_name = (leaf[-2], leaf[-1]) if len(leaf) > 1 else ("", leaf[-1])
    if param_name.endswith("bias"):
        return torch.zeros(shape)
    if "norm" in module_name or "norm" in param_name:
        return torch.ones(shape)
    std = config.init_method_std
    if name.endswith(_SCALED_INIT_SUFFIXES):
        std = std / math.sqrt(2.0 * config.num_layers)
    generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a parameter's global name (stable across processes)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _tensor_parallel_shard(
    full: torch.Tensor, param: torch.nn.Parameter, tp_size: int, tp_rank: int
) -> torch.Tensor:
    """This rank's piece of ``full``, cut as megatron's ``_initialize_affine_weight_cpu`` does."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = torch.split(full, full.shape[dim] // (tp_size * stride), dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def unwrap(chunk: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, GPTModel) and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def tied_embedding_pairs(
    model: list[torch.nn.Module],
) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(word embedding, head weight) pairs that this rank ties locally."""
    inner = [unwrap(chunk) for chunk in model]
    if not inner or not getattr(inner[0], "bitpipe_ties_embedding", False):
        return []
    embeddings = [m.embedding.word_embeddings.weight for m in inner if m.pre_process]
    heads = [m.output_layer.weight for m in inner if m.post_process]
    return list(zip(embeddings, heads, strict=True))


@torch.no_grad()
def tie_embedding_grads(model: list[torch.nn.Module]) -> None:
    """Sum the embedding and head gradients of locally tied pairs into both copies.

    Call after the replica / data-parallel reduction (it is linear, so the order with respect
    to that reduction only matters for rounding).
    """
    for embedding, head in tied_embedding_pairs(model):
        embedding_grad, head_grad = _grad_of(embedding), _grad_of(head)
        embedding_grad.add_(head_grad)
        head_grad.copy_(embedding_grad)


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    if grad is None:
        raise RuntimeError("a locally tied embedding has no gradient; was backward run?")
    return grad
