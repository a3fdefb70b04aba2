"""V-Min and V-Half: building block, repeat, reorder (see ``vshape`` for the overview)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from operator import add

from megatron_bitpipe.schedules.ir import Action, Kind, Schedule, W, requires
from megatron_bitpipe.schedules.placement import Placement, vshape
from megatron_bitpipe.schedules.vshape_common import (
    FORWARD,
    INPUT_GRAD,
    SLOTS_PER_MICROBATCH,
    State,
    _new_action,
    _no_gc,
    _PeriodicProgram,
    _shifted,
)

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
