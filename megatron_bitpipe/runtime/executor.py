"""Run one rank's lowered program: each action goes to its handler, in the order given.

The model work comes from ``StageCallbacks``; the executor owns the data flow between actions:

* F stashes ``(input, output)`` per (stage, microbatch) until its B (or, split, its W);
* a same-rank hand-over (the V turn, or any neighbour stage on this rank) passes
  ``output.detach().requires_grad_()`` as the next stage's input, and the gradient w.r.t. that
  input back to the producing stage's backward; other neighbours go through ``P2P``;
* once an output has left (its SEND_F is posted), the callbacks may drop its data
  (``release_output``, megatron's ``deallocate_output_tensor``): only its autograd graph is
  needed until its backward, and the P2P holds the payload until the send completes;
* every action's (start, end) is marked by a ``Clock`` (host time, or CUDA events on a GPU) and
  read back as ``trace`` (which ``megatron_bitpipe.schedules.render`` draws), and the most
  activations stashed at once is kept (``peak_live_activations``), comparable with
  ``simulate(schedule).peak_activations[rank]``.

It never invents an order: it runs exactly the program it is given, and after the last action it
raises if anything is left stashed, handed over, unsent or unreceived.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from megatron_bitpipe.runtime.callbacks import StageCallbacks
from megatron_bitpipe.runtime.clock import Clock, WallClock
from megatron_bitpipe.runtime.p2p import P2P
from megatron_bitpipe.schedules.ir import Action, Kind
from megatron_bitpipe.schedules.placement import Placement

logger = logging.getLogger(__name__)

FORWARD_KINDS = frozenset({Kind.F, Kind.SEND_F, Kind.RECV_F})


class TraceEvent(NamedTuple):
    """One action as run, in ``time.perf_counter`` seconds (GPU time with a CUDA clock).

    ``waited``: host seconds of the span spent waiting for a message from another rank (an
    input activation or an output gradient); ``cpu``: the process CPU seconds over the span,
    where the clock measures it (``CpuTimeClock``), else None."""

    action: Action
    start: float
    end: float
    waited: float = 0.0
    cpu: float | None = None


@dataclass
class _Stashed:
    input_tensor: torch.Tensor | None
    output_tensor: torch.Tensor
    output_grad: torch.Tensor | None = None
    input_grad_done: bool = False


def forward_program(program: Sequence[Action]) -> tuple[Action, ...]:
    """The forward part of a lowered program (F, SEND_F, RECV_F), same relative order."""
    return tuple(action for action in program if action.kind in FORWARD_KINDS)


class Executor:
    """Walks one rank's lowered program; ``run`` may be called once per training step."""

    def __init__(
        self,
        placement: Placement,
        rank: int,
        callbacks: StageCallbacks,
        p2p: P2P | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.placement = placement
        self.rank = rank
        self.callbacks = callbacks
        self.p2p = p2p
        self.clock = clock or WallClock()
        self.current_action: Action | None = None
        """The action being run (None outside ``run``)."""
        self.peak_live_activations = 0
        self._handlers: dict[Kind, Callable[[Action], None]] = {
            Kind.F: self._forward,
            Kind.B: self._backward,
            Kind.I: self._backward_input,
            Kind.W: self._backward_weight,
            Kind.SEND_F: self._send,
            Kind.SEND_B: self._send,
            Kind.RECV_F: self._post_recv,
            Kind.RECV_B: self._post_recv,
            Kind.REDUCE_GRAD: self._reduce_grad,
        }
        self._reset(forward_only=False)

    @property
    def trace(self) -> list[TraceEvent]:
        """Every action of the last run with its start and end (read after the run)."""
        if self._trace is None:
            seconds = self.clock.seconds
            cpu_seconds = getattr(self.clock, "cpu_seconds", None)
            self._trace = [
                TraceEvent(
                    action,
                    seconds(start),
                    seconds(end),
                    waited,
                    None if cpu_seconds is None else cpu_seconds(end) - cpu_seconds(start),
                )
                for action, start, end, waited in self._marks
            ]
        return self._trace

    @property
    def actions_done(self) -> int:
        """Actions of the current (or last) run completed so far: the run's progress."""
        return len(self._marks)

    @property
    def live_activations(self) -> int:
        """(stage, microbatch) pairs stashed right now: +1 at F, -1 after B (or W when split)."""
        return len(self._stash)

    def run(self, program: Sequence[Action], *, forward_only: bool = False) -> None:
        """Run ``program`` in order, then complete sends and check that nothing is left over.

        With ``forward_only`` nothing is stashed and the program may hold only F/SEND_F/RECV_F
        (see ``forward_program``); run it under ``torch.no_grad()`` to skip graphs.
        """
        if forward_only:
            extra = [str(action) for action in program if action.kind not in FORWARD_KINDS]
            if extra:
                raise ValueError(
                    f"rank {self.rank}: forward-only run got {', '.join(extra[:4])}; "
                    f"use forward_program"
                )
        self._reset(forward_only)
        logger.debug("rank %d: running %d actions", self.rank, len(program))
        handlers, marks, mark, p2p = self._handlers, self._marks, self.clock.mark, self.p2p
        self.clock.start()
        for position, action in enumerate(program):
            self.current_action = action
            self._waited = 0.0
            start = mark()
            try:
                handlers[action.kind](action)
                if p2p is not None:
                    p2p.release_completed()
            except Exception as error:
                if hasattr(error, "add_note"):
                    error.add_note(
                        f"rank {self.rank}: while running {action} "
                        f"(position {position} of {len(program)})"
                    )
                raise
            marks.append((action, start, mark(), self._waited))
        self.current_action = None
        if p2p is not None:
            p2p.finish()
        self._check_empty()

    # --- handlers ------------------------------------------------------------------------------

    def _forward(self, action: Action) -> None:
        stage, microbatch = action.stage, self._microbatch(action)
        input_tensor = self._input_of(stage, microbatch)
        output_tensor = self.callbacks.forward(stage, microbatch, input_tensor)
        if not self._forward_only:
            self._stash[(stage, microbatch)] = _Stashed(input_tensor, output_tensor)
            self.peak_live_activations = max(self.peak_live_activations, len(self._stash))
        following = self.placement.next_stage(stage)
        if following is None:
            return
        if self.placement.rank_of(following) == self.rank:
            handed = output_tensor.detach()
            if not self._forward_only and handed.is_floating_point():
                handed.requires_grad_()
            self._activations[(following, microbatch)] = handed
        else:
            self._outbox[Action(stage, Kind.SEND_F, microbatch)] = output_tensor

    def _backward(self, action: Action) -> None:
        stage, microbatch = action.stage, self._microbatch(action)
        stashed = self._stashed(action)
        if stashed.input_grad_done:
            raise RuntimeError(f"rank {self.rank}: {action} after {stage}I{microbatch}")
        del self._stash[(stage, microbatch)]
        output_grad = self._output_grad_of(stage, microbatch)
        input_grad = self.callbacks.backward(
            stage, microbatch, stashed.input_tensor, stashed.output_tensor, output_grad
        )
        self._hand_back(action, input_grad)

    def _backward_input(self, action: Action) -> None:
        stage, microbatch = action.stage, self._microbatch(action)
        stashed = self._stashed(action)
        if stashed.input_grad_done:
            raise RuntimeError(f"rank {self.rank}: {action} runs twice")
        stashed.output_grad = self._output_grad_of(stage, microbatch)
        input_grad = self.callbacks.backward_input(
            stage, microbatch, stashed.input_tensor, stashed.output_tensor, stashed.output_grad
        )
        stashed.input_grad_done = True
        self._hand_back(action, input_grad)

    def _backward_weight(self, action: Action) -> None:
        stage, microbatch = action.stage, self._microbatch(action)
        stashed = self._stashed(action)
        if not stashed.input_grad_done:
            raise RuntimeError(f"rank {self.rank}: {action} before {stage}I{microbatch}")
        del self._stash[(stage, microbatch)]
        self.callbacks.backward_weight(
            stage, microbatch, stashed.input_tensor, stashed.output_tensor, stashed.output_grad
        )

    def _send(self, action: Action) -> None:
        tensor = self._outbox.pop(action, None)
        if tensor is None:
            raise RuntimeError(f"rank {self.rank}: {action} before the action that produces it")
        self._require_p2p(action).send(action, tensor)
        if action.kind is Kind.SEND_F and not self._forward_only:
            self.callbacks.release_output(action.stage, self._microbatch(action), tensor)

    def _post_recv(self, action: Action) -> None:
        self._require_p2p(action).post_recv(action)

    def _reduce_grad(self, action: Action) -> None:
        self.callbacks.reduce_grad(action.stage)

    # --- data flow between actions ---------------------------------------------------------------

    def _input_of(self, stage: int, microbatch: int) -> torch.Tensor | None:
        previous = self.placement.prev_stage(stage)
        if previous is None:
            return None
        if self.placement.rank_of(previous) == self.rank:
            handed = self._activations.pop((stage, microbatch), None)
            if handed is None:
                raise RuntimeError(
                    f"rank {self.rank}: {stage}F{microbatch} needs the output of "
                    f"{previous}F{microbatch} (same rank), which has not run"
                )
            return handed
        action = Action(stage, Kind.RECV_F, microbatch)
        received = self._wait_recv(self._require_p2p(action), action)
        if not self._forward_only and received.is_floating_point():
            received.requires_grad_()
        return received

    def _output_grad_of(self, stage: int, microbatch: int) -> torch.Tensor | None:
        following = self.placement.next_stage(stage)
        if following is None:
            return None
        if self.placement.rank_of(following) == self.rank:
            handed = self._grads.pop((stage, microbatch), None)
            if handed is None:
                raise RuntimeError(
                    f"rank {self.rank}: backward of stage {stage} microbatch {microbatch} needs "
                    f"the input gradient of stage {following} (same rank), which has not run"
                )
            return handed
        action = Action(stage, Kind.RECV_B, microbatch)
        p2p = self._require_p2p(action)
        output_grad = self._wait_recv(p2p, action)
        # the gradient came back, so our activation has arrived: its send can be completed now
        p2p.complete_send(Action(stage, Kind.SEND_F, microbatch))
        return output_grad

    def _wait_recv(self, p2p: P2P, action: Action) -> torch.Tensor:
        """``p2p.wait_recv``, its host time added to the running action's ``waited``."""
        waiting = time.perf_counter()
        received = p2p.wait_recv(action)
        self._waited += time.perf_counter() - waiting
        return received

    def _hand_back(self, action: Action, input_grad: torch.Tensor | None) -> None:
        stage, microbatch = action.stage, self._microbatch(action)
        previous = self.placement.prev_stage(stage)
        if previous is None:
            return
        if input_grad is None:
            raise RuntimeError(
                f"rank {self.rank}: {action} returned no input gradient, "
                f"but stage {previous} needs one"
            )
        if self.placement.rank_of(previous) == self.rank:
            self._grads[(previous, microbatch)] = input_grad
        else:
            self._outbox[Action(stage, Kind.SEND_B, microbatch)] = input_grad

    # --- bookkeeping -----------------------------------------------------------------------------

    def _stashed(self, action: Action) -> _Stashed:
        stashed = self._stash.get((action.stage, self._microbatch(action)))
        if stashed is None:
            raise RuntimeError(
                f"rank {self.rank}: {action} before {action.stage}F{action.microbatch}"
            )
        return stashed

    def _microbatch(self, action: Action) -> int:
        if action.microbatch is None:
            raise ValueError(f"rank {self.rank}: {action} has no microbatch")
        return action.microbatch

    def _require_p2p(self, action: Action) -> P2P:
        if self.p2p is None:
            raise RuntimeError(f"rank {self.rank}: {action} needs a P2P, but the executor has none")
        return self.p2p

    def _reset(self, forward_only: bool) -> None:
        self._forward_only = forward_only
        self._marks: list[tuple[Action, Any, Any, float]] = []
        self._waited = 0.0
        self._trace: list[TraceEvent] | None = None
        self.peak_live_activations = 0
        self._stash: dict[tuple[int, int], _Stashed] = {}
        self._activations: dict[tuple[int, int], torch.Tensor] = {}
        self._grads: dict[tuple[int, int], torch.Tensor] = {}
        self._outbox: dict[Action, torch.Tensor] = {}

    def _check_empty(self) -> None:
        left = [f"stashed activation of {stage}F{mb}" for stage, mb in self._stash]
        left += [f"hand-over activation for {stage}F{mb}" for stage, mb in self._activations]
        left += [f"hand-over gradient for {stage}B{mb}" for stage, mb in self._grads]
        left += [f"unsent {action}" for action in self._outbox]
        if self.p2p is not None:
            left += [f"pending {message}" for message in self.p2p.outstanding()]
        if left:
            shown = "; ".join(left[:8]) + (f"; ... ({len(left)} in all)" if len(left) > 8 else "")
            raise RuntimeError(
                f"rank {self.rank}: the program ended with state left over: {shown}. "
                f"It is incomplete or not lowered for this placement."
            )
