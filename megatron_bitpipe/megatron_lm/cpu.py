"""Megatron-LM's training loop on CPU with gloo (tests, laptops): applied only without CUDA.

On top of ``megatron_bitpipe.mcore.cpu`` (megatron-core's CUDA assumptions), Megatron-LM's own
loop needs the workarounds below, each the smallest one found (checked
against core_v0.16.1). ``apply(argv)`` installs them and returns ``argv`` with the flags a CPU
run needs, unless the user gave the flag or its opposite.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import types
from typing import Any

import torch

from megatron_bitpipe.mcore import cpu as mcore_cpu

TRITON_MODULE = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
CPU_FLAGS = (
    ("--distributed-backend", "gloo"),  # NCCL is not built into a CPU torch
    ("--transformer-impl", "local"),  # Transformer Engine's spec needs CUDA
    ("--no-persist-layer-norm", None),  # torch's LayerNorm has no persistent variant
    ("--no-gradient-accumulation-fusion", None),  # the fused wgrad kernel is CUDA-only
    ("--no-rope-fusion", None),  # RoPE's fused kernel needs Transformer Engine
    ("--no-masked-softmax-fusion", None),  # bf16/fp16 would call scaled_masked_softmax_cuda
)
SITE = os.path.join(os.path.dirname(__file__), "site")
"""Holds a ``sitecustomize`` that stubs triton in every interpreter (checkpoint writers spawn)."""


def needed() -> bool:
    return mcore_cpu.needed()


def apply(argv: list[str], *, megatron_schedule: bool) -> list[str]:
    """Install the workarounds (without CUDA) and return ``argv`` plus the CPU flags it lacks.

    ``megatron_schedule``: megatron-core's own schedule runs (its p2p needs two config changes).
    """
    if not needed():
        return argv
    stub_triton_kernels()
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [SITE, package_root, os.environ.get("PYTHONPATH")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    mcore_cpu.apply()
    torch.cuda.device_count = lambda: 1  # type: ignore[assignment]
    torch.cuda.set_device = lambda *args, **kwargs: None  # type: ignore[assignment]
    torch.cuda.Stream = lambda *args, **kwargs: mcore_cpu._NullStream()  # type: ignore[assignment,misc]
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()  # type: ignore[assignment]
    _patch_megatron_lm(megatron_schedule)
    _allow_sequence_parallel_torch_norm()
    return argv + [
        token
        for flag, value in CPU_FLAGS
        if flag not in argv
        for token in ((flag,) if value is None else (flag, value))
    ]


def stub_triton_kernels() -> None:
    """``megatron.training.initialize`` imports a triton kernel module at its top; without triton
    a stub stands in (a fake ``triton`` would break ``torch._dynamo``)."""
    if importlib.util.find_spec("triton") is not None or TRITON_MODULE in sys.modules:
        return
    stub = types.ModuleType(TRITON_MODULE)

    def needs_triton(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("batch-invariant kernels need triton (a GPU build of torch)")

    stub.enable_batch_invariant_mode = needs_triton  # type: ignore[attr-defined]
    stub.is_batch_invariant_mode_enabled = lambda: False  # type: ignore[attr-defined]
    sys.modules[TRITON_MODULE] = stub


def _allow_sequence_parallel_torch_norm() -> None:
    """torch_norm.py:32 refuses ``--sequence-parallel`` (the local spec's norm without apex):
    the norm then comes from ``mcore.specs.SequenceParallelTorchNorm``, a torch norm whose
    parameters carry megatron's ``sequence_parallel`` mark (their gradients are summed over
    tensor parallel, as megatron does for its own norms), as in our trainer."""
    from megatron.core.transformer import torch_norm

    from megatron_bitpipe.mcore.specs import SequenceParallelTorchNorm

    original = torch_norm.WrappedTorchNorm.__new__
    if getattr(original, "bitpipe_sequence_parallel", False):
        return

    def __new__(cls: type, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> Any:
        if config.sequence_parallel:
            return SequenceParallelTorchNorm(config, hidden_size, eps)
        return original(cls, config, hidden_size, eps, **kwargs)

    __new__.bitpipe_sequence_parallel = True  # type: ignore[attr-defined]
    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)  # type: ignore[assignment]


def _patch_megatron_lm(megatron_schedule: bool) -> None:
    from megatron.training import arguments, initialize, training

    # initialize.py:60 asserts CUDA unless allow_no_cuda; pretrain calls the name in training.py
    training.initialize_megatron = functools.partial(
        initialize.initialize_megatron, allow_no_cuda=True
    )
    # initialize.py:169 runs make in the wheel's datasets folder, which ships no Makefile
    initialize._compile_dependencies = lambda: None
    # training.py:792 warms torch.compile'd fusions for a GPU: 11-19 s per process on a CPU
    training.set_jit_fusion_options = lambda *args, **kwargs: None
    # arguments.py:927 reads the GPU's architecture when TP > 1
    arguments.get_device_arch_version = lambda: 10
    if megatron_schedule:
        _wrap_transformer_config(arguments)


def _wrap_transformer_config(arguments: Any) -> None:
    """megatron's interleaved schedule frees a sent output before gloo has read it (with
    overlap_p2p_comm), and synchronizes CUDA after batched p2p. core_transformer_config_from_args
    is imported by name by pretrain_gpt.py and gpt_builders.py, so it is wrapped before them;
    from core_v0.18 it lives in ``argument_utils``, whose ``gpt_config_from_args`` calls it."""
    original = arguments.core_transformer_config_from_args
    if getattr(original, "bitpipe_cpu", False):
        return

    @functools.wraps(original)
    def core_transformer_config_from_args(args: Any, *rest: Any, **kwargs: Any) -> Any:
        config = original(args, *rest, **kwargs)
        overrides = mcore_cpu.config_overrides(overlap_p2p_comm=bool(config.overlap_p2p_comm))
        for name, value in overrides.items():
            setattr(config, name, value)
        return config

    core_transformer_config_from_args.bitpipe_cpu = True  # type: ignore[attr-defined]
    arguments.core_transformer_config_from_args = core_transformer_config_from_args
    try:
        from megatron.training import argument_utils
    except ImportError:
        return
    argument_utils.core_transformer_config_from_args = core_transformer_config_from_args
