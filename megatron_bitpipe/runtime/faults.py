"""Faults made on purpose, for the reliability tests and soak runs.

``MEGATRON_BITPIPE_FAULT`` holds comma-separated specs ``KIND@POINT[:rank=R][:iteration=I]
[:microbatch=M]`` (iterations as the log numbers them, from 1; ranks are global):

    kill@setup:rank=1                 SIGKILL rank 1 at its start, before the rendezvous
    stop@step:rank=1:iteration=2      SIGSTOP rank 1 as its step 2 starts (its peers are inside it)
    kill@optimizer:rank=0:iteration=2 before the optimizer step of iteration 2
    kill@save:rank=1:iteration=4      while the checkpoint of iteration 4 is being written
    nan@loss:iteration=2:microbatch=3 the loss of global microbatch 3 of iteration 2 is NaN
    perturb@parameters:rank=1:iteration=2   rank 1 nudges one parameter after step 2

Unset (always, outside tests) ``planned`` is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

VARIABLE = "MEGATRON_BITPIPE_FAULT"
SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


@dataclass(frozen=True)
class Fault:
    """One planned fault; None fields match anything."""

    kind: str
    point: str
    rank: int | None = None
    iteration: int | None = None
    microbatch: int | None = None

    def matches(self, point: str, rank: int | None, iteration: int | None, microbatch: int | None) -> bool:
        wanted = ((self.rank, rank), (self.iteration, iteration), (self.microbatch, microbatch))
        return self.point == point and all(want is None or want == got for want, got in wanted)


def parse(text: str) -> list[Fault]:
    """The specs of ``MEGATRON_BITPIPE_FAULT``; a malformed one raises ValueError naming it."""
    faults = []
    for spec in filter(None, (part.strip() for part in text.split(","))):
        head, *fields = spec.split(":")
        kind, _, point = head.partition("@")
        try:
            values = {name: int(value) for name, value in (field.split("=") for field in fields)}
            faults.append(Fault(kind, point, **values))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{VARIABLE}: cannot read {spec!r}: {error}") from error
        if not point or kind not in (*SIGNALS, "nan", "perturb"):
            raise ValueError(f"{VARIABLE}: cannot read {spec!r}: expected KIND@POINT[:name=value]")
    return faults


def planned(
    point: str,
    *,
    rank: int | None = None,
    iteration: int | None = None,
    microbatch: int | None = None,
) -> Fault | None:
    """The fault planned at this point, if any."""
    text = os.environ.get(VARIABLE)
    if not text:
        return None
    for fault in parse(text):
        if fault.matches(point, rank, iteration, microbatch):
            return fault
    return None


def trigger(point: str, *, rank: int, iteration: int | None = None) -> None:
    """Kill or stop this process if a ``kill`` / ``stop`` fault is planned here."""
    fault = planned(point, rank=rank, iteration=iteration)
    if fault is not None and fault.kind in SIGNALS:
        print(f"fault: rank {rank}: {fault.kind}@{point}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), SIGNALS[fault.kind])
