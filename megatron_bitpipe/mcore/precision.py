"""bf16 / fp16 chunks that cast by their own stage, not by megatron's pipeline-rank predicates.

megatron's ``Float16Module`` converts the inputs of the pipeline's first rank to half precision
and returns fp32 from its last rank. On V and bidirectional placements those predicates are wrong:
rank D-1 holds middle chunks too (BitPipe's down stage D-1 would upcast its output to fp32 and
send twice the bytes its receiver expects), and rank 0 holds a head. ``StageFloat16Module`` casts
by the chunk's own ``pre_process`` (it holds the embedding) and ``post_process`` (it holds the
head and returns the loss), which is what megatron's predicates mean on a looped placement.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import (
    Float16Module,
    float16_to_fp32,
    fp32_to_float16,
)

from megatron_bitpipe.mcore.model import unwrap


class StageFloat16Module(Float16Module):
    """``Float16Module`` whose casts follow the wrapped chunk's ``pre_process``/``post_process``."""

    def __init__(self, config: TransformerConfig, module: torch.nn.Module) -> None:
        super().__init__(config, module)
        inner = unwrap(module)
        self.holds_embedding = bool(inner.pre_process)
        self.holds_head = bool(inner.post_process)

    def forward(self, *inputs: Any, fp32_output: bool = True, **kwargs: Any) -> Any:
        if self.holds_embedding:
            inputs = fp32_to_float16(inputs, self.float16_convertor)
        outputs = self.module(*inputs, **kwargs)
        if self.holds_head and fp32_output:
            outputs = float16_to_fp32(outputs)
        return outputs


def wrap_half_precision(chunks: list[torch.nn.Module], config: TransformerConfig) -> list[Any]:
    """Each chunk in ``StageFloat16Module`` when ``config`` asks for bf16 or fp16."""
    if not (config.bf16 or config.fp16):
        return chunks
    return [StageFloat16Module(config, chunk) for chunk in chunks]
