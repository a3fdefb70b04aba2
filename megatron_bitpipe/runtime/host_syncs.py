"""Count the calls that make the host wait for the device, on any machine.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches synchronizing CUDA calls, but only
there. ``HostSyncAudit`` counts, on the CPU as well, the Python-level calls known to synchronize
the host with the device when tensors live on a GPU:

* reading a value: ``Tensor.item``, ``tolist``, ``numpy``, ``bool()``, ``int()``, ``float()``,
  ``index()``, and device-to-host copies (``Tensor.cpu``);
* copies from pageable host memory: ``Tensor.to`` / ``Tensor.cuda`` with a target device and
  without ``non_blocking=True`` (on a CPU-only run every such call counts, since the audit cannot
  tell where the tensor would live on a GPU), and ``torch.tensor(..., device="cuda...")``;
* data-dependent shapes: ``nonzero``, ``masked_select``, ``unique``;
* explicit waits: ``torch.cuda.synchronize``, ``Stream.synchronize``, ``Event.synchronize``, and
  ``Work.wait`` with a timeout (ProcessGroupNCCL then blocks the host until the GPU is done);
* the object collectives of ``torch.distributed`` (``all_gather_object`` and its kin), which
  pickle through host memory.

Each call is recorded with the first caller outside this module (``file:line``), so a report
points at the code to change. Patching is process-wide while the audit is open.

``HOST_ONLY`` lists the few callers known to read tensors that live on the host whatever the
device (the audit cannot tell them apart on a CPU-only run), each with the reason.
"""

from __future__ import annotations

import collections
import functools
import os
import sys
from types import FrameType
from typing import Any, Callable

import torch
import torch.distributed as dist

_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
_DATA_DEPENDENT = ("nonzero", "masked_select", "unique")
_OBJECT_COLLECTIVES = (
    "all_gather_object",
    "gather_object",
    "broadcast_object_list",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
)
_HERE = os.path.abspath(__file__)
HOST_ONLY = {
    "megatron/core/tensor_parallel/random.py": "compares CPU RNG states (torch.get_rng_state)",
}


class HostSyncAudit:
    """Context manager: ``calls`` maps each synchronizing call to (count, first caller)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = collections.OrderedDict()
        self._restore: list[Callable[[], None]] = []

    def __enter__(self) -> HostSyncAudit:
        for name in _READS + _DATA_DEPENDENT:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        for name in _DATA_DEPENDENT:
            self._wrap(torch, name, f"torch.{name}")
        self._wrap(torch.Tensor, "to", "Tensor.to", when=_copies_from_pageable)
        self._wrap(torch.Tensor, "cuda", "Tensor.cuda", when=_blocking_cuda_copy)
        self._wrap(torch, "tensor", "torch.tensor(device=cuda)", when=_to_cuda)
        self._wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
        self._wrap(torch.cuda.Stream, "synchronize", "Stream.synchronize")
        self._wrap(torch.cuda.Event, "synchronize", "Event.synchronize")
        self._wrap(dist.Work, "wait", "Work.wait(timeout)", when=_has_timeout)
        for name in _OBJECT_COLLECTIVES:
            self._wrap(dist, name, f"dist.{name}")
        return self

    def __exit__(self, *exc: object) -> None:
        while self._restore:
            self._restore.pop()()

    @property
    def total(self) -> int:
        return sum(count for count, _ in self.calls.values())

    def report(self) -> str:
        """One line: every call with its count and first caller, or 'none'."""
        if not self.calls:
            return "none"
        return "; ".join(f"{name} x{count} (first at {where})" for name, (count, where) in self.calls.items())

    def _record(self, name: str) -> None:
        where = _caller(sys._getframe(2))
        if any(where.rsplit(":", 1)[0].endswith(path) for path in HOST_ONLY):
            return
        entry = self.calls.get(name)
        if entry is None:
            self.calls[name] = [1, where]
        else:
            entry[0] += 1

    def _wrap(
        self,
        owner: Any,
        name: str,
        label: str,
        when: Callable[..., bool] | None = None,
    ) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        own = name in vars(owner)
        audit = self

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if when is None or when(*args, **kwargs):
                audit._record(label)
            return original(*args, **kwargs)

        setattr(owner, name, counted)
        if own:
            self._restore.append(lambda: setattr(owner, name, original))
        else:
            self._restore.append(lambda: delattr(owner, name))


def _caller(frame: FrameType | None) -> str:
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == _HERE:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _target_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    device = kwargs.get("device")
    for value in args:
        if isinstance(value, (torch.device, str, int)) and not isinstance(value, bool):
            device = value
            break
        if isinstance(value, torch.Tensor):
            device = value.device
            break
    return device


def _copies_from_pageable(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
    if kwargs.get("non_blocking") or (len(args) >= 2 and isinstance(args[1], bool) and args[1]):
        return False
    device = _target_device(args, kwargs)
    if device is None:
        return False
    if torch.cuda.is_available():
        return torch.device(device) != tensor.device and not tensor.is_pinned()
    return True


def _blocking_cuda_copy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
    return not kwargs.get("non_blocking", False) and tensor.device.type == "cpu"


def _to_cuda(*args: Any, **kwargs: Any) -> bool:
    device = kwargs.get("device")
    return device is not None and str(device).startswith("cuda")


def _has_timeout(work: Any, *args: Any, **kwargs: Any) -> bool:
    return bool(args) or kwargs.get("timeout") is not None
