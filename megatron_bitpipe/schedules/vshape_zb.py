"""V-ZB: closed-form warm-up and steady state, greedy cool-down (overview in ``vshape``)."""

from __future__ import annotations

from collections import deque

from megatron_bitpipe.schedules.errors import ScheduleConfigError, ScheduleError
from megatron_bitpipe.schedules.ir import Action, F, I, Kind, Schedule, W
from megatron_bitpipe.schedules.placement import Placement, vshape
from megatron_bitpipe.schedules.vshape_common import (
    DOWN,
    FORWARD,
    INPUT_GRAD,
    SLOTS_PER_MICROBATCH,
    UP,
    _no_gc,
    _PeriodicProgram,
)

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
            "v-zb",
            "microbatches",
            num_microbatches,
            f"must be >= 2 * {{pp}} - 1 = {2 * num_ranks - 1}: rank 0 runs 2*pp-1 forwards before "
            "the first backward reaches it, and fewer leave bubbles the zero-bubble plan does not "
            "cover; use v-half or v-min for fewer microbatches",
        )
