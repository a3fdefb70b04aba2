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

Speed (D=64, N=1024 is 393k actions): the planners go slot by slot only through the warm-up and
the cool-down, O(D) slots per rank. In between, every rank repeats the same six slots with each
microbatch one higher; once the whole planning state has come round (the same counts, the same
actions one microbatch later) they skip to the cool-down and write the repeats in bulk
(``_PeriodicProgram``). Why each skip is exact is noted where it happens (``_RepeatedPlan.peak``,
``_ProgramWriter.write_steady``, ``_zb_steady_periods``).
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat
from operator import add

from megatron_bitpipe.schedules.errors import ScheduleConfigError, ScheduleError
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule, F, I, W, requires
from megatron_bitpipe.schedules.placement import Placement, vshape
from megatron_bitpipe.schedules.registry import ScheduleSpec, register

SLOTS_PER_MICROBATCH = 6
"""One rank's work for one microbatch at unit cost: F f I i W w."""

DOWN, UP = 0, 1
"""Legs of the V, as indices into ``placement.rank_stages[rank]``."""

FORWARD, INPUT_GRAD = Kind.F, Kind.I
"""Bound once: looking up an enum member costs more than the comparisons in the hot loops."""

State = tuple[int, int]
"""(live activations, pending W) before a slot."""


# --- programs with a repeating middle ------------------------------------------------------------

_new_action = partial(tuple.__new__, Action)
"""``Action(stage, kind, microbatch)`` from one tuple, without the Python-level constructor."""


def _actions(stage: int, kind: Kind, microbatches: range) -> list[Action]:
    """``[Action(stage, kind, m) for m in microbatches]``, built in C."""
    return list(map(_new_action, zip(repeat(stage), repeat(kind), microbatches)))


def _shifted(action: Action, microbatches: int) -> Action:
    """``action`` for the microbatch ``microbatches`` later."""
    stage, kind, microbatch = action
    return _new_action((stage, kind, microbatch + microbatches))


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a few 100k acyclic tuples.

    Each Action holds a Kind (a tracked object), so every tuple stays tracked and the collector
    rescans the growing heap over and over: about a third of the time at D=64, N=1024.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class _PeriodicProgram:
    """One rank's program: ``head``, then ``body`` ``repeats`` times with every microbatch one
    higher each time, then ``tail``.

        head F0 F1, body I0 F2, repeats 3, tail I3  ->  F0 F1 I0 F2 I1 F3 I2 F4 I3
    """

    head: list[Action]
    body: list[Action]
    repeats: int
    tail: list[Action]

    @property
    def body_start(self) -> int:
        return len(self.head)

    @property
    def body_stop(self) -> int:
        return len(self.head) + len(self.body) * self.repeats

    def __len__(self) -> int:
        return self.body_stop + len(self.tail)

    def __getitem__(self, position: int) -> Action:
        if position < self.body_start:
            return self.head[position]
        if position < self.body_stop:
            repeat_index, index = divmod(position - self.body_start, len(self.body))
            return _shifted(self.body[index], repeat_index)
        return self.tail[position - self.body_stop]

    def expand(self) -> tuple[Action, ...]:
        """Every action in order; the repeats are built one body position at a time."""
        columns = [
            _actions(stage, kind, range(first, first + self.repeats))
            for stage, kind, first in self.body
        ]
        middle = chain.from_iterable(zip(*columns))
        return tuple(chain(self.head, middle, self.tail))


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


def _step(state: State, action: Action | None) -> State:
    """(live activations, pending W) after one slot; a free slot runs the oldest pending W."""
    live, pending = state
    if action is None:
        return (live - 1, pending - 1) if pending else state
    if action.kind is FORWARD:
        return live + 1, pending
    return live, pending + 1


class _RepeatedPlan:
    """Paper step 2 without storing it: microbatch m's block shifted by 6m slots on every rank.

    Rank 0 bounds the phases (its first I is the latest block slot, its first F the earliest):
    ``steady`` is rank 0's first I to its last F; only the slots outside it are reordered.
    """

    def __init__(
        self, block: list[tuple[int, int, int, int]], placement: Placement, num_microbatches: int
    ) -> None:
        self.num_microbatches = num_microbatches
        self._first_slot: dict[tuple[int, Kind], int] = {}
        self._by_residue: list[list[tuple[int, int, Kind] | None]] = []
        for rank, offsets in enumerate(block):
            down, up = placement.rank_stages[rank]
            residues: list[tuple[int, int, Kind] | None] = [None] * SLOTS_PER_MICROBATCH
            block_actions = ((down, FORWARD), (up, FORWARD), (up, INPUT_GRAD), (down, INPUT_GRAD))
            for offset, (stage, kind) in zip(offsets, block_actions, strict=True):
                assert residues[offset % SLOTS_PER_MICROBATCH] is None, "blocks share a slot"
                residues[offset % SLOTS_PER_MICROBATCH] = (offset, stage, kind)
                self._first_slot[stage, kind] = offset
            self._by_residue.append(residues)
        last = SLOTS_PER_MICROBATCH * (num_microbatches - 1)
        self.stops = [max(offsets) + last + 1 for offsets in block]
        """Per rank, one past its last slot."""
        self.steady = range(block[0][3], block[0][0] + last + 1)
        self.cooldown_start = self.steady.stop - 1 - SLOTS_PER_MICROBATCH
        """A period before the steady state's end: no cool-down action moves before it."""

    def action_at(self, rank: int, slot: int) -> Action | None:
        entry = self._by_residue[rank][slot % SLOTS_PER_MICROBATCH]
        if entry is None or slot < entry[0]:
            return None
        offset, stage, kind = entry
        microbatch = (slot - offset) // SLOTS_PER_MICROBATCH
        if microbatch >= self.num_microbatches:
            return None
        return _new_action((stage, kind, microbatch))

    def slot_of(self, stage: int, kind: Kind, microbatch: int) -> int:
        return self._first_slot[stage, kind] + SLOTS_PER_MICROBATCH * microbatch

    def timeline(self, rank: int, start: int, stop: int, state: State) -> _Timeline:
        """The rank's slots start..stop-1 as planned; ``state`` before ``start``."""
        actions = {}
        for slot in range(start, stop):
            action = self.action_at(rank, slot)
            if action is not None:
                actions[slot] = action
        return _Timeline(actions, start, stop, state)

    def peak(self, rank: int) -> int:
        """Most activations live at once on ``rank``, free slots running W.

        In the steady state the slots repeat every 6; once the state repeats too, so do the
        following periods (see ``_ProgramWriter.write_steady``), and they are skipped.
        """
        state, peak = (0, 0), 0
        at_last_period: State | None = None
        slot, stop = 0, self.stops[rank]
        while slot < stop:
            if self._is_period_boundary(slot):
                if state == at_last_period:
                    slot = self.cooldown_start
                at_last_period = state
            state = _step(state, self.action_at(rank, slot))
            peak = max(peak, state[0])
            slot += 1
        return peak

    def _is_period_boundary(self, slot: int) -> bool:
        """Whether ``slot`` starts one of the whole periods from the steady start to the
        cool-down window."""
        return (
            self.steady.start <= slot < self.cooldown_start
            and (self.cooldown_start - slot) % SLOTS_PER_MICROBATCH == 0
        )


class _Timeline:
    """One rank's F and I actions on slots start..stop-1 while planning; W stays implicit.

    ``_live[t - start]`` and ``_pending[t - start]`` are the state before slot t, correct up to
    slot ``_known``: a move updates them up to its old slot, the later ones are recomputed when
    asked for, and the reorder asks in slot order. A state depends only on the slots before it,
    so a window that starts in the right state plans its slots as the whole timeline would.
    """

    def __init__(self, actions: dict[int, Action], start: int, stop: int, state: State) -> None:
        self.actions = actions
        self.start, self.stop = start, stop
        self._live = [state[0]] * (stop - start + 1)
        self._pending = [state[1]] * (stop - start + 1)
        self._known = start

    def move_if_fits(self, old: int, new: int, cap: int) -> bool:
        """Move the action at ``old`` to the free slot ``new`` if the peak stays <= cap.

        Only slots new..old can rise: after ``old`` no fewer W have run than before the move.
        """
        if new in self.actions:
            return False
        self._restate(old)
        live, pending, start = self._live, self._pending, self.start
        changes = self._changes(old, new)
        for first, last, live_change, _ in changes:
            if max(live[first - start : last + 1 - start]) + live_change > cap:
                return False
        self.actions[new] = self.actions.pop(old)
        for first, last, live_change, pending_change in changes:
            stretch = slice(first - start, last + 1 - start)
            live[stretch] = map(add, live[stretch], repeat(live_change))
            if pending_change:
                pending[stretch] = map(add, pending[stretch], repeat(pending_change))
        self._known = old
        return True

    def _changes(self, old: int, new: int) -> list[tuple[int, int, int, int]]:
        """How the states before slots new+1..old change if the action at ``old`` moves to the
        free slot ``new``: stretches (first, last, live change, pending change), the states
        before slots first..last changing by that much.

        At ``new`` the action adds its activation or its pending W, and the W that ran there, if
        any, no longer runs (+1 live, +1 pending). Each extra pending W then runs in the next free
        slot that ran none ("idle"), one live fewer; every other slot does the same as before. So
        the change never returns to nothing before ``old`` and lies in at most three stretches.
        """
        start = self.start
        live_change, pending_change = (1, 0) if self.actions[old].kind is FORWARD else (0, 1)
        if self._pending[new - start]:
            live_change, pending_change = live_change + 1, pending_change + 1
        changes = []
        first = new + 1
        while pending_change:
            idle = self._next_idle(first, old)
            if idle is None:
                break
            changes.append((first, idle, live_change, pending_change))
            first = idle + 1
            live_change, pending_change = live_change - 1, pending_change - 1
        changes.append((first, old, live_change, pending_change))
        return changes

    def _next_idle(self, first: int, stop: int) -> int | None:
        """The first free slot in first..stop-1 with no W pending, if any."""
        pending, start = self._pending, self.start
        slot = first
        while slot < stop:
            try:
                slot = pending.index(0, slot - start, stop - start) + start
            except ValueError:
                return None
            if slot not in self.actions:
                return slot
            slot += 1
        return None

    def _restate(self, until: int) -> None:
        """Make the states before slots up to ``until`` correct."""
        actions, live, pending, start = self.actions, self._live, self._pending, self.start
        state = live[self._known - start], pending[self._known - start]
        for slot in range(self._known, until):
            state = _step(state, actions.get(slot))
            live[slot + 1 - start], pending[slot + 1 - start] = state
        self._known = max(self._known, until)


class _Reorder:
    """Paper step 4, over one window per rank at a time; remembers where actions moved."""

    def __init__(self, plan: _RepeatedPlan, placement: Placement, cap: int) -> None:
        self.plan, self.cap = plan, cap
        self.moved: dict[tuple[int, Kind, int], int] = {}
        self._producers = {
            (stage, kind): [
                (producer, FORWARD if what == "activation" else INPUT_GRAD)
                for what, producer, _ in requires(Action(stage, kind, 0), placement)
            ]
            for stage in range(placement.num_stages)
            for kind in (FORWARD, INPUT_GRAD)
        }
        """(stage, kind) -> the (stage, kind) of each producer of the same microbatch."""

    def run(self, timelines: list[_Timeline], movable: Callable[[int], bool]) -> None:
        """Visit actions in slot order; move each one in a movable slot to the earliest free slot
        after its inputs (unit time) where its rank's peak stays within the plan's peak."""
        visits = sorted(
            (slot, rank)
            for rank, timeline in enumerate(timelines)
            for slot in timeline.actions
            if movable(slot)
        )
        for slot, rank in visits:
            timeline = timelines[rank]
            action = timeline.actions[slot]
            inputs = self._inputs(action)
            earliest = 1 + max((self._slot_of(*before) for before in inputs), default=-1)
            assert earliest >= timeline.start, "an action moves before its planning window"
            for new in range(earliest, slot):
                if timeline.move_if_fits(slot, new, self.cap):
                    self.moved[action] = new
                    break

    def _inputs(self, action: Action) -> list[tuple[int, Kind, int]]:
        """What must run before ``action``: its producers and its stage's previous microbatch."""
        stage, kind, microbatch = action
        assert microbatch is not None
        inputs = [(producer, what, microbatch) for producer, what in self._producers[stage, kind]]
        if microbatch > 0:
            inputs.append((stage, kind, microbatch - 1))
        return inputs

    def _slot_of(self, stage: int, kind: Kind, microbatch: int) -> int:
        moved = self.moved.get((stage, kind, microbatch))  # an Action hashes as its tuple
        return self.plan.slot_of(stage, kind, microbatch) if moved is None else moved


@dataclass
class _Boundary:
    """A writer at the start of a period: its state, its pending W (stage, microbatch) and how
    many actions it had written."""

    state: State
    pending: list[tuple[int, int]]
    written: int

    def came_round_from(self, before: _Boundary) -> bool:
        """Same state as ``before``, the same W pending one microbatch on."""
        return self.state == before.state and self.pending == [
            (stage, microbatch + 1) for stage, microbatch in before.pending
        ]


class _ProgramWriter:
    """Paper step 3, written out: one rank's order from its slots, each free slot running the
    oldest pending W, the remaining W at the end."""

    def __init__(self) -> None:
        self.program = _PeriodicProgram([], [], 0, [])
        self._out = self.program.head
        self._pending: deque[Action] = deque()
        self._live = 0

    @property
    def state(self) -> State:
        return self._live, len(self._pending)

    def write(self, action: Action | None) -> None:
        if action is None:
            if self._pending:
                self._out.append(self._pending.popleft())
                self._live -= 1
            return
        self._out.append(action)
        if action.kind is FORWARD:
            self._live += 1
        else:
            self._pending.append(W(action.stage, action.microbatch))

    def write_window(self, timeline: _Timeline) -> None:
        for slot in range(timeline.start, timeline.stop):
            self.write(timeline.actions.get(slot))

    def write_steady(self, plan: _RepeatedPlan, rank: int, start: int, stop: int) -> None:
        """Slots start..stop-1 as planned, where slot t+6 holds slot t's action one microbatch on.

        What a period writes follows from the state, the pending W and the period's actions. Once
        a period ends in the state it began in, with the same W pending one microbatch on, the
        next period writes the same one microbatch on and ends likewise, and so on to ``stop``.
        """
        at_last_period: _Boundary | None = None
        for slot in range(start, stop):
            periods_left, offset = divmod(stop - slot, SLOTS_PER_MICROBATCH)
            if offset == 0:
                now = self._boundary()
                if at_last_period is not None and now.came_round_from(at_last_period):
                    self._repeat_last_period(at_last_period.written, periods_left)
                    return
                at_last_period = now
            self.write(plan.action_at(rank, slot))

    def _boundary(self) -> _Boundary:
        pending = [(w.stage, w.microbatch) for w in self._pending]
        return _Boundary(self.state, pending, len(self._out))

    def finish(self) -> _PeriodicProgram:
        """The program, with the W still pending at the end."""
        self._out.extend(self._pending)
        self._pending.clear()
        return self.program

    def _repeat_last_period(self, since: int, repeats: int) -> None:
        """The actions written since ``since``, ``repeats`` more times; then write the tail."""
        assert not self.program.body, "one repeating stretch per rank"
        self.program.body = [_shifted(action, 1) for action in self._out[since:]]
        self.program.repeats = repeats
        self._out = self.program.tail
        self._pending = deque(_shifted(w, repeats) for w in self._pending)


def _building_block_programs(
    memory: str, placement: Placement, num_microbatches: int
) -> tuple[tuple[Action, ...], ...]:
    """Block, repeat, reorder; the programs fill W into free slots.

    The reorder visits slots in order and each move only reads and changes the slots from the
    action's inputs to its old slot, so it runs on two windows per rank: the warm-up, then the
    cool-down once the writers have walked the steady state and know the state it starts in.
    """
    num_ranks = placement.num_ranks
    plan = _RepeatedPlan(_block(memory, num_ranks), placement, num_microbatches)
    steady = plan.steady
    reorder = _Reorder(plan, placement, cap=max(plan.peak(rank) for rank in range(num_ranks)))
    writers = [_ProgramWriter() for _ in range(num_ranks)]
    if plan.cooldown_start < steady.start:
        # few microbatches: the warm-up runs into the cool-down; one window holds every slot
        timelines = [plan.timeline(rank, 0, plan.stops[rank], (0, 0)) for rank in range(num_ranks)]
        reorder.run(timelines, lambda slot: slot not in steady)
        for writer, timeline in zip(writers, timelines, strict=True):
            writer.write_window(timeline)
    else:
        # warm-up, the slots before rank 0's first I: each action moves to its earliest free slot
        # (its inputs are in earlier slots, so all in this window)
        warmups = [plan.timeline(rank, 0, steady.start, (0, 0)) for rank in range(num_ranks)]
        reorder.run(warmups, lambda slot: True)
        # steady, up to a period before rank 0's last F: per period each rank's F f i I at its
        # block's slots, W w in two of the free ones, as the repeated block lays them out
        for rank, (writer, warmup) in enumerate(zip(writers, warmups, strict=True)):
            writer.write_window(warmup)
            writer.write_steady(plan, rank, steady.start, plan.cooldown_start)
        # cool-down, the slots after rank 0's last F: each action moves as in the warm-up, never
        # before this window, which starts a period earlier: it waits for its stage's previous
        # microbatch, 6 slots before it and itself moved no earlier than the window
        cooldowns = [
            plan.timeline(rank, plan.cooldown_start, plan.stops[rank], writers[rank].state)
            for rank in range(num_ranks)
        ]
        reorder.run(cooldowns, lambda slot: slot >= steady.stop)
        for writer, cooldown in zip(writers, cooldowns, strict=True):
            writer.write_window(cooldown)
    with _no_gc():
        return tuple(writer.finish().expand() for writer in writers)


def _building_block_schedule(
    name: str, memory: str, num_ranks: int, num_microbatches: int
) -> Schedule:
    placement = vshape(num_ranks)
    return Schedule(
        name=name,
        placement=placement,
        num_microbatches=num_microbatches,
        microbatch_pipeline=(0,) * num_microbatches,
        programs=_building_block_programs(memory, placement, num_microbatches),
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

    def steady_body(self) -> list[Action]:
        """The next F I W f i w, without writing it."""
        down, up = self.stages
        forward_down, grad_down = self.forwards[DOWN], self.input_grads[DOWN]
        forward_up, grad_up = self.forwards[UP], self.input_grads[UP]
        return [
            F(down, forward_down),
            I(down, grad_down),
            W(down, grad_down),
            F(up, forward_up),
            I(up, grad_up),
            W(up, grad_up),
        ]

    def skip(self, times: int) -> None:
        """Count ``times`` steady bodies as written."""
        for leg in (DOWN, UP):
            self.forwards[leg] += times
            self.input_grads[leg] += times


def _zb_phases(placement: Placement, rank: int, num_microbatches: int) -> _PeriodicProgram:
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
    head, plan.actions = plan.actions, []
    # steady: F I W f i w while both legs have a forward left and the up leg one after this f
    repeats = max(0, min(plan.forwards_left(DOWN), plan.forwards_left(UP) - 1))
    body = plan.steady_body()
    plan.skip(repeats)
    # steady end: F I W f i w (F while forwards remain), up to the last f
    while plan.forwards_left(UP):
        if plan.forwards_left(DOWN):
            plan.forward(DOWN)
        plan.backward(DOWN)
        plan.forward(UP)
        if plan.forwards_left(UP):
            plan.backward(UP)
    return _PeriodicProgram(head, body, repeats, plan.actions)


class _ZbRun:
    """Every rank in unit time: its phases in order, then the greedy cool-down.

    An action starts when its inputs finished in an earlier step. Each stage runs its F and its I
    in microbatch order, so "F(s, m) finished" is ``forwards_done[s] > m`` (``input_grads_done``
    likewise), counted at the end of each step.
    """

    def __init__(self, placement: Placement, num_microbatches: int) -> None:
        self.placement = placement
        self.num_microbatches = num_microbatches
        num_stages = placement.num_stages
        self.phases = [
            _zb_phases(placement, rank, num_microbatches) for rank in range(placement.num_ranks)
        ]
        self.positions = [0] * placement.num_ranks
        """Per rank, how many of its phase actions have run."""
        self.cooldowns: list[list[Action]] = [[] for _ in self.phases]
        self._pending: list[deque[Action]] = [deque() for _ in self.phases]
        self.forwards_done = [0] * num_stages
        self.input_grads_done = [0] * num_stages
        self._previous = [placement.prev_stage(stage) for stage in range(num_stages)]
        self._following = [placement.next_stage(stage) for stage in range(num_stages)]
        self._lengths = [len(phase) for phase in self.phases]
        self._bodies = [range(phase.body_start, phase.body_stop) for phase in self.phases]

    def is_ready(self, action: tuple[int, Kind, int]) -> bool:
        """``ir.requires`` on the counts: every input finished in an earlier step."""
        stage, kind, microbatch = action
        if kind is FORWARD:
            previous = self._previous[stage]
            return previous is None or self.forwards_done[previous] > microbatch
        if kind is INPUT_GRAD:
            following = self._following[stage]
            return self.forwards_done[stage] > microbatch and (
                following is None or self.input_grads_done[following] > microbatch
            )
        return self.input_grads_done[stage] > microbatch

    def run(self) -> None:
        remaining = SLOTS_PER_MICROBATCH * self.num_microbatches * self.placement.num_ranks
        time = 0
        last_period: deque[list[int]] = deque(maxlen=SLOTS_PER_MICROBATCH)
        while remaining:
            if len(last_period) == SLOTS_PER_MICROBATCH:
                periods = _zb_steady_periods(self._bodies, last_period[0], self.positions)
                if periods:
                    self._skip(periods)
                    remaining -= SLOTS_PER_MICROBATCH * periods * len(self.phases)
                    time += SLOTS_PER_MICROBATCH * periods
                    last_period.clear()
            last_period.append(self.positions.copy())
            started = self._step()
            if not started:
                raise ScheduleError(f"v-zb: no rank can start an action at time {time} (deadlock)")
            for action in started:
                if action.kind is FORWARD:
                    self.forwards_done[action.stage] += 1
                elif action.kind is INPUT_GRAD:
                    self.input_grads_done[action.stage] += 1
            remaining -= len(started)
            time += 1

    def _step(self) -> list[Action]:
        """What each rank starts in one step."""
        started = []
        for rank, phase in enumerate(self.phases):
            position = self.positions[rank]
            if position < self._lengths[rank]:
                action = phase[position]
                if self.is_ready(action):
                    self.positions[rank] += 1
                    started.append(action)
            else:
                choice = self._cooldown_choice(rank)
                if choice is not None:
                    self.cooldowns[rank].append(choice)
                    started.append(choice)
        return started

    def _cooldown_choice(self, rank: int) -> Action | None:
        """Cool-down rule: a ready I (its W waits), else the oldest pending W, else idle."""
        pending = self._pending[rank]
        for stage in self.placement.rank_stages[rank]:
            microbatch = self.input_grads_done[stage]
            if microbatch >= self.num_microbatches:
                continue
            if self.is_ready((stage, INPUT_GRAD, microbatch)):
                pending.append(W(stage, microbatch))
                return I(stage, microbatch)
        return pending.popleft() if pending else None

    def _skip(self, periods: int) -> None:
        """Run ``periods`` steady periods at once: each rank runs F I W f i w ``periods`` times."""
        self.positions = [position + SLOTS_PER_MICROBATCH * periods for position in self.positions]
        self.forwards_done = [done + periods for done in self.forwards_done]
        self.input_grads_done = [done + periods for done in self.input_grads_done]


def _zb_steady_periods(bodies: list[range], before: list[int], now: list[int]) -> int:
    """How many steady periods may be skipped, given each rank's steady body (positions in its
    phases) and its position 6 steps ago and now.

    Where every rank's next action and the six after it lie in its steady body, a step from
    positions P + 6 does what the step from P does one microbatch on: each rank's action is the
    same one microbatch on, and every count it waits on is one higher. So once every rank
    advanced by exactly 6 in the last 6 steps from inside its body, the next 6 steps do the
    same, as long as the positions stay at most 7 before the body's end.
    """
    periods = None
    for body, position_before, position in zip(bodies, before, now, strict=True):
        if position != position_before + SLOTS_PER_MICROBATCH or position_before < body.start:
            return 0
        last_safe = body.stop - SLOTS_PER_MICROBATCH - 1
        rank_periods = (last_safe - position) // SLOTS_PER_MICROBATCH + 1
        periods = rank_periods if periods is None else min(periods, rank_periods)
    return max(periods or 0, 0)


def _zb_programs(placement: Placement, num_microbatches: int) -> tuple[tuple[Action, ...], ...]:
    """Each rank's phases, then its cool-down as the unit-time run chose it."""
    run = _ZbRun(placement, num_microbatches)
    run.run()
    with _no_gc():
        return tuple(
            _PeriodicProgram(phase.head, phase.body, phase.repeats, phase.tail + cooldown).expand()
            for phase, cooldown in zip(run.phases, run.cooldowns, strict=True)
        )


def generate_v_zb(num_ranks: int, num_microbatches: int) -> Schedule:
    """V-ZB: peak 2D chunk activations (as 1F1B), no bubble within any rank's span."""
    check_v_zb(num_ranks, num_microbatches)
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
