"""Layout-independent dropout: each layer's masks depend on the seed, the step, the global layer
number and the global microbatch, never on which rank or chunk runs it or in which order.

megatron draws dropout masks from one generator per rank (and, for attention in a tensor-parallel
region, from its RNG tracker's ``model-parallel-rng``), so the masks a layer gets depend on how
many draws the rank made before: on the pipeline layout and the schedule. ``install(chunks,
seed)`` adds a forward pre-hook to every transformer layer (and to the embedding, layer 0) that
reseeds both streams from ``(seed, step, layer, microbatch)`` while one of our schedules runs a
microbatch (``running``); activation recomputation repeats the layer under the same reseed, as
the backward of a microbatch runs under its number. Under megatron-core's own schedules (no
microbatch known) the hooks do nothing. Tensor parallelism keeps megatron's per-rank offset of
the model-parallel stream, so masks match across pipeline layouts, not across TP sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel

MODEL_PARALLEL_OFFSET = 2718
"""megatron's offset of the model-parallel stream (``model_parallel_cuda_manual_seed``)."""


@dataclass
class _Current:
    step: int = 0
    microbatch: int | None = None


_CURRENT = _Current()


def next_step() -> None:
    """A new training step (each forward-backward call): masks differ from the last step's."""
    _CURRENT.step += 1


def set_step(step: int) -> None:
    """The step count so far (a trainer resuming at iteration k + 1 sets k): the next step's masks
    are those of an uninterrupted run's."""
    _CURRENT.step = step


@contextlib.contextmanager
def running(microbatch: int) -> Iterator[None]:
    """Layers run inside draw the masks of ``microbatch`` (the forward, or the backward that may
    recompute it)."""
    previous, _CURRENT.microbatch = _CURRENT.microbatch, microbatch
    try:
        yield
    finally:
        _CURRENT.microbatch = previous


def stream_seed(seed: int, step: int, layer: int, microbatch: int) -> int:
    """The seed of one layer's masks for one microbatch of one step (a 63-bit mix)."""
    value = (seed * 1_000_003 + step) * 1_000_033 + layer
    value = value * 1_000_037 + microbatch
    return (value * 0x9E3779B97F4A7C15) % (2**63 - 1)


def install(chunks: list[Any], seed: int) -> None:
    """Reseed dropout per (step, layer, microbatch) in every layer and embedding of ``chunks``
    (idempotent per module); the step count starts again (a new model)."""
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.transformer_layer import TransformerLayer

    _CURRENT.step = 0  # a new model counts its steps from the start
    for chunk in chunks:
        for module in chunk.modules():
            if getattr(module, "_bitpipe_dropout_hook", False):
                continue
            if isinstance(module, TransformerLayer):
                layer = int(module.layer_number)
            elif isinstance(module, LanguageModelEmbedding):
                layer = 0
            else:
                continue
            module.register_forward_pre_hook(_reseeding(seed, layer))
            module._bitpipe_dropout_hook = True


def _reseeding(seed: int, layer: int) -> Any:
    def hook(module: Any, args: Any) -> None:
        if _CURRENT.microbatch is None or not module.training:
            return
        _reseed(stream_seed(seed, _CURRENT.step, layer, _CURRENT.microbatch))

    return hook


def _reseed(value: int) -> None:
    """The default generators and megatron's model-parallel stream, from ``value``."""
    torch.manual_seed(value)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = getattr(tracker, "states_", {})
    name = "model-parallel-rng"
    if name in states:
        offset = MODEL_PARALLEL_OFFSET + parallel_state.get_tensor_model_parallel_rank()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        generator = torch.Generator(device=device)
        generator.manual_seed((value + offset) % (2**63 - 1))
        states[name] = generator.get_state()
