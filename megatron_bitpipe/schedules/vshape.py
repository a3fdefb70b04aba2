"""V-shape schedules with controllable memory: V-Min, V-Half and V-ZB (arXiv 2405.15362).

Placement ``vshape(D)``: rank r holds stage r of the down leg and stage 2D-1-r of the up leg, so
a microbatch runs down the ranks and back up; the turn D-1 -> D is local to rank D-1 and the loss
is on rank 0. The backward is split into I (input gradient, on the critical path) and W (weight
gradient, free to float). Per rank, ``F``/``f`` are the forwards of its down/up-leg stage,
``I``/``i`` their input gradients and ``W``/``w`` their weight gradients.

All three plan with unit costs (F = I = W, no communication time), as the paper's tables do; other
costs keep the orders valid but not their bubble figures. Memory is counted in chunk activations,
+1 at F and -1 at W; 1F1B holds 2D.

V-Min and V-Half use the paper's building-block method (Section 3.1 and Appendix A, as the
fork's ``v_auto_schedule.py`` cites them):
  1. building block: the slots of one microbatch's F f i I on every rank (``_block``);
  2. repeat: microbatch m's block shifted by 6m slots, one rank's work per microbatch;
  3. W fills free slots, oldest first (implicit while planning, see ``_Timeline``);
  4. reorder: warm-up and cool-down actions move to the earliest free slot their inputs allow
     when the rank's peak stays within the repeated plan's peak;
  5. squeeze: the simulator and the executor run each rank's order as soon as inputs arrive.
Peak: V-Min 2*floor((D+4)/3), V-Half 2*floor((D+2)/2) chunk activations. The bubble is at most the
fork's (``zbv_greedy.py``, D <= 8, any N) except V-Min with 3 | D, one slot more: the fork reorders
twice, with a squeeze between, we once.

V-ZB holds 2D (as 1F1B) and has no bubble inside any rank's span for N >= 2D-1 (the start skew of
D-1 slots remains). Warm-up and steady state are closed-form phases per rank; the cool-down is
greedy. The orders equal those of the fork's greedy ``try_v_schedule`` with max_mem = 2D
(sail-sg/zero-bubble-pipeline-parallelism, ``zbv.py``).
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable

from megatron_bitpipe.schedules.errors import ScheduleConfigError, ScheduleError
from megatron_bitpipe.schedules.ir import Action, Fact, Kind, Schedule, F, I, W, produces, requires
from megatron_bitpipe.schedules.placement import Placement, vshape
from megatron_bitpipe.schedules.registry import ScheduleSpec, register

SLOTS_PER_MICROBATCH = 6
"""One rank's work for one microbatch at unit cost: F f I i W w."""

DOWN, UP = 0, 1
"""Legs of the V, as indices into ``placement.rank_stages[rank]``."""


# --- V-Min and V-Half: building block, repeat, reorder -------------------------------------------


def _block(memory: str, num_ranks: int) -> list[tuple[int, int, int, int]]:
    """Slots of microbatch 0's (F, f, i, I) on each rank: the paper's building blocks.

    V-Min's lifespans (F to W) add up to about 4D slots per rank, so about 4D/6 activations live at
    once; V-Half's to about 6D. The gap keeps the repeated blocks from sharing a slot.
    """
    d = num_ranks
    if memory == "min":
        gap = 2 if d % 3 == 0 else 0
        return [(r, 2 * d - 1 - r, 2 * d + gap + r, 4 * d + gap - 1 - r) for r in range(d)]
    gap = 3 if d % 2 == 0 else 0
    return [(2 * r, 3 * d - 2 - r, 3 * d + gap + 2 * r - 1, 6 * d + gap - 2 - r) for r in range(d)]


def _step(state: tuple[int, int], action: Action | None) -> tuple[int, int]:
    """(live activations, pending W) after one slot; a free slot runs the oldest pending W."""
    live, pending = state
    if action is None:
        return (live - 1, pending - 1) if pending else state
    if action.kind is Kind.F:
        return live + 1, pending
    return live, pending + 1


class _Timeline:
    """One rank's F and I actions by slot while planning; W stays implicit (see ``_step``).

    ``_states[t]`` is (live, pending) before slot t, kept up to date as actions move.
    """

    def __init__(self, actions: dict[int, Action]) -> None:
        self.actions = actions
        self._states = [(0, 0)]
        for slot in range(max(actions) + 1):
            self._states.append(_step(self._states[-1], actions.get(slot)))

    def peak(self) -> int:
        """Most activations live at once."""
        return max(live for live, _ in self._states)

    def fits(self, old: int, new: int, cap: int) -> bool:
        """Whether the action at ``old`` may move to the free slot ``new`` with the peak <= cap.

        Only slots new..old can rise: after ``old`` no fewer W have run than before the move, and
        once the state is back on the current plan's track it stays there until ``old``.
        """
        if new in self.actions:
            return False
        state = _step(self._states[new], self.actions[old])
        for slot in range(new + 1, old):
            if state[0] > cap:
                return False
            if state == self._states[slot]:
                return True
            state = _step(state, self.actions.get(slot))
        return state[0] <= cap

    def move(self, old: int, new: int) -> None:
        """Move the action at ``old`` to ``new``; restate slots until back on the old track."""
        self.actions[new] = self.actions.pop(old)
        states = self._states
        for slot in range(new, len(states) - 1):
            state = _step(states[slot], self.actions.get(slot))
            if slot >= old and state == states[slot + 1]:
                return
            states[slot + 1] = state

    def program(self) -> list[Action]:
        """The rank's order: actions by slot, the oldest pending W in each free slot, then the
        remaining W."""
        program: list[Action] = []
        pending: deque[Action] = deque()
        for slot in range(max(self.actions) + 1):
            action = self.actions.get(slot)
            if action is None and pending:
                program.append(pending.popleft())
            elif action is not None:
                program.append(action)
                if action.kind is Kind.I:
                    pending.append(W(action.stage, action.microbatch))
        return program + list(pending)


def _repeat(
    block: list[tuple[int, int, int, int]], placement: Placement, num_microbatches: int
) -> list[_Timeline]:
    """Each rank's timeline with microbatch m's block shifted by 6m slots."""
    timelines = []
    for rank, offsets in enumerate(block):
        down, up = placement.rank_stages[rank]
        actions: dict[int, Action] = {}
        for microbatch in range(num_microbatches):
            shift = SLOTS_PER_MICROBATCH * microbatch
            copy = (F(down, microbatch), F(up, microbatch), I(up, microbatch), I(down, microbatch))
            for offset, action in zip(offsets, copy, strict=True):
                actions[offset + shift] = action
        timelines.append(_Timeline(actions))
    return timelines


def _inputs(action: Action, placement: Placement) -> list[Action]:
    """Actions that must run before ``action``: its producers and its stage's previous
    microbatch."""
    assert action.microbatch is not None
    inputs = [
        F(stage, microbatch) if what == "activation" else I(stage, microbatch)
        for what, stage, microbatch in requires(action, placement)
    ]
    if action.microbatch > 0:
        inputs.append(Action(action.stage, action.kind, action.microbatch - 1))
    return inputs


def _reorder(
    timelines: list[_Timeline], placement: Placement, movable: Callable[[int], bool]
) -> None:
    """Paper step 4: visit actions in slot order; move each one in a movable slot to the earliest
    free slot after its inputs (unit time) where its rank's peak stays within the plan's peak."""
    cap = max(timeline.peak() for timeline in timelines)
    slot_of = {action: slot for timeline in timelines for slot, action in timeline.actions.items()}
    visits = sorted((slot, rank) for rank, line in enumerate(timelines) for slot in line.actions)
    for slot, rank in visits:
        if not movable(slot):
            continue
        timeline = timelines[rank]
        action = timeline.actions[slot]
        earliest = 1 + max((slot_of[before] for before in _inputs(action, placement)), default=-1)
        for new in range(earliest, slot):
            if timeline.fits(slot, new, cap):
                timeline.move(slot, new)
                slot_of[action] = new
                break


def _building_block_schedule(
    name: str, memory: str, num_ranks: int, num_microbatches: int
) -> Schedule:
    """Block, repeat, reorder; the programs fill W into free slots."""
    placement = vshape(num_ranks)
    timelines = _repeat(_block(memory, num_ranks), placement, num_microbatches)
    # steady: F f i I W w as the repeated block lays them out, from rank 0's first I to its last F
    slot_of = {action: slot for slot, action in timelines[0].actions.items()}
    steady = range(slot_of[I(0, 0)], slot_of[F(0, num_microbatches - 1)] + 1)
    # warm-up and cool-down: actions move earlier without raising the peak
    _reorder(timelines, placement, lambda slot: slot not in steady)
    return Schedule(
        name=name,
        placement=placement,
        num_microbatches=num_microbatches,
        microbatch_pipeline=(0,) * num_microbatches,
        programs=tuple(tuple(timeline.program()) for timeline in timelines),
        options=(("memory", memory),),
    )


def generate_v_min(num_ranks: int, num_microbatches: int) -> Schedule:
    """V-Min: peak 2*floor((D+4)/3) chunk activations (about 1/3 of 1F1B)."""
    return _building_block_schedule("v-min", "min", num_ranks, num_microbatches)


def generate_v_half(num_ranks: int, num_microbatches: int) -> Schedule:
    """V-Half: peak 2*floor((D+2)/2) chunk activations (about 1/2 of 1F1B)."""
    return _building_block_schedule("v-half", "half", num_ranks, num_microbatches)


def check_v_shape(num_ranks: int, num_microbatches: int) -> None:
    """V-Min and V-Half take any --pp >= 1 and --microbatches >= 1 (checked by the registry)."""


# --- V-ZB: closed-form warm-up and steady state, greedy cool-down --------------------------------


class _RankPlan:
    """One rank's V-ZB actions while they are written; counts each leg's microbatches."""

    def __init__(self, placement: Placement, rank: int, num_microbatches: int) -> None:
        self.stages = placement.rank_stages[rank]
        self.num_microbatches = num_microbatches
        self.forwards = [0, 0]
        self.input_grads = [0, 0]
        self.actions: list[Action] = []

    def forwards_left(self, leg: int) -> int:
        return self.num_microbatches - self.forwards[leg]

    def forward(self, leg: int, times: int = 1) -> None:
        for _ in range(times):
            self.actions.append(F(self.stages[leg], self.forwards[leg]))
            self.forwards[leg] += 1

    def backward(self, leg: int) -> None:
        """I, then its W at once."""
        microbatch = self.input_grads[leg]
        self.actions += [I(self.stages[leg], microbatch), W(self.stages[leg], microbatch)]
        self.input_grads[leg] += 1


def _zb_phases(placement: Placement, rank: int, num_microbatches: int) -> _RankPlan:
    """Rank ``rank``'s V-ZB actions up to its last f (needs N >= 2D-1)."""
    plan = _RankPlan(placement, rank, num_microbatches)
    d = placement.num_ranks
    # warm-up: F x (2D-1-2r), the forwards that fit before microbatch 0 returns from the turn
    plan.forward(DOWN, 2 * d - 1 - 2 * rank)
    # warm-up: (f F) x r, f   -> 2D activations live
    for _ in range(rank):
        plan.forward(UP)
        plan.forward(DOWN)
    plan.forward(UP)
    # fill: (i w f) x (D-1-r), i w
    for _ in range(d - 1 - rank):
        plan.backward(UP)
        plan.forward(UP)
    plan.backward(UP)
    # steady: F I W f i w (F while forwards remain), up to the last f
    while plan.forwards_left(UP):
        if plan.forwards_left(DOWN):
            plan.forward(DOWN)
        plan.backward(DOWN)
        plan.forward(UP)
        if plan.forwards_left(UP):
            plan.backward(UP)
    return plan


def _cooldown_choice(
    plan: _RankPlan, pending: deque[Action], is_ready: Callable[[Action], bool]
) -> Action | None:
    """Cool-down rule: a ready I (its W waits), else the oldest pending W, else idle."""
    for leg in (DOWN, UP):
        action = I(plan.stages[leg], plan.input_grads[leg])
        if plan.input_grads[leg] < plan.num_microbatches and is_ready(action):
            plan.input_grads[leg] += 1
            pending.append(W(action.stage, action.microbatch))
            return action
    return pending.popleft() if pending else None


def _is_ready(
    action: Action, placement: Placement, done_at: dict[Fact, int], time: int
) -> bool:
    """Whether every input of ``action`` is done by ``time`` (unit-time planning)."""
    return all(done_at.get(fact, time + 1) <= time for fact in requires(action, placement))


def _zb_programs(placement: Placement, num_microbatches: int) -> tuple[tuple[Action, ...], ...]:
    """Run every rank in unit time: its phases in order, then the greedy cool-down."""
    plans = [_zb_phases(placement, rank, num_microbatches) for rank in range(placement.num_ranks)]
    phase_lengths = [len(plan.actions) for plan in plans]
    pending: list[deque[Action]] = [deque() for _ in plans]
    programs: list[list[Action]] = [[] for _ in plans]
    done_at: dict[Fact, int] = {}
    remaining = SLOTS_PER_MICROBATCH * num_microbatches * placement.num_ranks
    time = 0
    while remaining:
        ready = partial(_is_ready, placement=placement, done_at=done_at, time=time)
        started = []
        for rank, plan in enumerate(plans):
            position = len(programs[rank])
            if position < phase_lengths[rank]:
                choice = plan.actions[position] if ready(plan.actions[position]) else None
            else:
                choice = _cooldown_choice(plan, pending[rank], ready)
            if choice is not None:
                programs[rank].append(choice)
                started.append(choice)
        if not started:
            raise ScheduleError(f"v-zb: no rank can start an action at time {time} (deadlock)")
        for action in started:
            done_at.update((fact, time + 1) for fact in produces(action))
        remaining -= len(started)
        time += 1
    return tuple(tuple(program) for program in programs)


def generate_v_zb(num_ranks: int, num_microbatches: int) -> Schedule:
    """V-ZB: peak 2D chunk activations (as 1F1B), no bubble within any rank's span."""
    placement = vshape(num_ranks)
    return Schedule(
        name="v-zb",
        placement=placement,
        num_microbatches=num_microbatches,
        microbatch_pipeline=(0,) * num_microbatches,
        programs=_zb_programs(placement, num_microbatches),
        options=(("memory", "zb"),),
    )


def check_v_zb(num_ranks: int, num_microbatches: int) -> None:
    """V-ZB needs N >= 2D-1: rank 0 runs 2D-1 forwards before microbatch 0 comes back."""
    if num_microbatches < 2 * num_ranks - 1:
        raise ScheduleConfigError(
            f"v-zb: --microbatches {num_microbatches} must be >= 2 * --pp - 1 = "
            f"{2 * num_ranks - 1}: rank 0 runs 2*pp-1 forwards before the first backward reaches "
            f"it, and fewer leave bubbles the zero-bubble plan does not cover; use v-half or "
            f"v-min for fewer microbatches"
        )


register(
    ScheduleSpec(
        name="v-min",
        generate=generate_v_min,
        check=check_v_shape,
        summary="V-shape with about 1/3 of 1F1B's activation memory (arXiv 2405.15362)",
    )
)
register(
    ScheduleSpec(
        name="v-half",
        generate=generate_v_half,
        check=check_v_shape,
        summary="V-shape with about 1/2 of 1F1B's activation memory (arXiv 2405.15362)",
    )
)
register(
    ScheduleSpec(
        name="v-zb",
        generate=generate_v_zb,
        check=check_v_zb,
        summary="V-shape zero bubble with 1F1B's activation memory (arXiv 2405.15362)",
    )
)
