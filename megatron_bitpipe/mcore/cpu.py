"""Let megatron-core run on CPU with gloo (tests, laptops); nothing changes when CUDA is present.

megatron-core hard-codes CUDA in a few places. ``apply()``
installs the smallest workaround for each, once per process:

* factory calls with ``device="cuda"`` and ``Tensor.cuda()`` stay on the CPU;
* ``torch.cuda.current_device()`` answers the CPU device (receive buffers, DDP buffers);
* the model-parallel RNG tracker reads and writes the CPU generator;
* ``torch.cuda.synchronize`` and ``torch.cuda.current_stream`` become no-ops;
* ``Tensor.type()`` names CPU tensors as CUDA ones (``torch.cuda.FloatTensor``): the optimizers
  pick their code path, and the distributed optimizer its parameter check, by that string.

The model config needs ``config_overrides()`` as well.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint")
_applied = False


def needed() -> bool:
    """True when megatron-core must run without CUDA."""
    return not torch.cuda.is_available()


def apply() -> None:
    """Install the CPU workarounds when CUDA is absent; idempotent."""
    global _applied
    if _applied or not needed():
        return
    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = _tensor_stays_on_cpu  # type: ignore[method-assign]
    torch.Tensor.type = _type_named_as_cuda(torch.Tensor.type)  # type: ignore[method-assign]
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()  # type: ignore[assignment]
    _route_rng_to_cpu()
    _applied = True


def compute_device() -> torch.device:
    """Where megatron-core computes: the current CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def config_overrides(*, overlap_p2p_comm: bool = False) -> dict[str, Any]:
    """TransformerConfig settings a CPU run needs.

    No CUDA synchronize after batched p2p. With ``overlap_p2p_comm`` (megatron's interleaved
    schedule at PP=2), outputs are not pseudo-freed: megatron frees a sent output's storage right
    after posting its isend without waiting, and gloo may still be reading it. Without overlap
    megatron waits for its sends first, and our executor keeps the payload alive itself.
    """
    if not needed():
        return {}
    return {"batch_p2p_sync": False, "deallocate_pipeline_outputs": not overlap_p2p_comm}


def _is_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


def _tensor_stays_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _type_named_as_cuda(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or self.device.type != "cpu":
            return original(self, *args, **kwargs)
        return original(self).replace("torch.", "torch.cuda.", 1)

    return type_


class _NullStream:
    """Stands in for a CUDA stream: every wait is already satisfied on the CPU."""

    def wait_stream(self, stream: object) -> None:
        del stream

    def synchronize(self) -> None:
        return None


def _seed_cpu_generator(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _route_rng_to_cpu() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = get_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = set_state  # type: ignore[assignment]
    torch.cuda.manual_seed = _seed_cpu_generator  # type: ignore[assignment]
    torch.cuda.manual_seed_all = _seed_cpu_generator  # type: ignore[assignment]
    # fork() warns at every dropout because the "CUDA" and CPU generators are now one.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)
