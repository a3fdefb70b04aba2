"""megatron-core features our executor does not run correctly yet: refused, by name, up front.

Each entry says what the feature is and why it is refused; ``check_supported`` raises one error
listing every one that is switched on, before the first action runs.
"""

from __future__ import annotations

from typing import Any, Sequence

from megatron_bitpipe.schedules.placement import Placement


class UnsupportedFeatureError(NotImplementedError):
    """A megatron-core setting the executor cannot honour; the text names it."""


def unsupported_features(
    config: Any,
    ddp_configs: Sequence[Any],
    splits_backward: bool,
    placement: Placement,
    uncovered_linears: Sequence[str] = (),
) -> list[str]:
    """The settings of ``config`` (TransformerConfig) and the chunks' DDP configs we refuse;
    ``uncovered_linears`` names linear layers the weight-gradient store does not split."""
    found = []
    if splits_backward and uncovered_linears:
        found.append(
            f"a schedule that splits the backward into I and W with linear layers the weight-"
            f"gradient store cannot defer ({', '.join(uncovered_linears[:3])}: Transformer "
            f"Engine's; use megatron's local spec)"
        )
    loss_ranks = placement.loss_ranks()
    if getattr(config, "calculate_per_token_loss", False) and loss_ranks != {placement.num_ranks - 1}:
        found.append(
            f"calculate_per_token_loss with loss heads on pipeline ranks {sorted(loss_ranks)} "
            f"(megatron's finalize_model_grads takes the token count from the last rank only)"
        )
    if getattr(config, "defer_embedding_wgrad_compute", False):
        found.append(
            "defer_embedding_wgrad_compute (megatron drains the deferred output-layer gradients in "
            "its own schedules only: they would be lost)"
        )
    if getattr(config, "variable_seq_lengths", False):
        found.append(
            "variable_seq_lengths (every message is received into a buffer of the one shape "
            "seq_length and micro_batch_size give)"
        )
    if any(getattr(ddp, "overlap_param_gather", False) for ddp in ddp_configs):
        found.append(
            "overlap_param_gather (the distributed optimizer's parameter all-gather is hooked to "
            "megatron's forward order, not the schedule's)"
        )
    if getattr(config, "enable_cuda_graph", False) or getattr(config, "external_cuda_graph", False):
        found.append("CUDA graphs (enable_cuda_graph / external_cuda_graph)")
    if getattr(config, "cuda_graph_impl", "none") not in ("none", None):
        found.append(f"CUDA graphs (cuda_graph_impl={config.cuda_graph_impl!r})")
    if getattr(config, "cpu_offloading", False):
        found.append("activation offloading (cpu_offloading)")
    if getattr(config, "fine_grained_activation_offloading", False):
        found.append("activation offloading (fine_grained_activation_offloading)")
    return found


def check_supported(
    schedule: str,
    config: Any,
    ddp_configs: Sequence[Any],
    splits_backward: bool,
    placement: Placement,
    uncovered_linears: Sequence[str] = (),
) -> None:
    """Raise UnsupportedFeatureError naming every refused setting of ``schedule`` on
    ``placement`` that is on."""
    found = unsupported_features(config, ddp_configs, splits_backward, placement, uncovered_linears)
    if found:
        raise UnsupportedFeatureError(
            f"{schedule}: not supported by megatron_bitpipe's executor yet: " + "; ".join(found)
        )
