"""The runtime (executor + p2p + replica grad sync) against a single-process oracle, CPU and gloo.

Toy model: stage position p is one ``Linear(H, H) + tanh`` seeded by p; the last stage of a
pipeline returns ``loss_scale * sum(y**2)``. The oracle runs all positions on every microbatch in
one process with loss ``sum(y**2) / N``. Per schedule and rank the distributed run must give the
same per-microbatch losses, the same gradient for every parameter (after the replica sync for
bidirectional schedules; their up copies start from other weights and are fixed by
``broadcast_replica_parameters``), a trace equal to the program, no left-over state, and a peak
stash equal to ``simulate(schedule).peak_activations``; a forward-only run repeats the losses.

One spawn runs every case for D=2 (p2p through a pipeline group, replica grads summed) and one for
D=4 (p2p on one channel per direction, replica grads averaged with the loss scaled by 2/N); each
also runs 1F1B with pipeline rank r on global rank D-1-r. A generator gets ``BUILD_DEADLINE_S``.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
import traceback
from datetime import timedelta
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from megatron_bitpipe.runtime import (
    P2P,
    Executor,
    P2PError,
    P2PTimeoutError,
    ReplicaGradSync,
    broadcast_replica_parameters,
    build_channels,
    forward_program,
    replica_pair_groups,
)
from megatron_bitpipe.schedules import placement as placements
from megatron_bitpipe.schedules import registry
from megatron_bitpipe.schedules.ir import B, F, I, Action, Kind, Schedule, W
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.placement import Placement
from megatron_bitpipe.schedules.simulate import simulate
from megatron_bitpipe.schedules.validate import validate
from schedule_fixtures import bidirectional_gpipe, one_f_one_b, vshape_gpipe

DTYPE = torch.float64
HIDDEN = 5
MICRO_BATCH = 3
CASE_TIMEOUT_S = 20.0
BUILD_DEADLINE_S = 5.0
SPAWN_DEADLINE_S = 240.0
REVERSED = "@reversed-ranks"
"""Case suffix: pipeline rank r runs on global rank D-1-r (p2p translates through the group)."""
REGISTRY_OPTIONS = {"interleaved-1f1b": {"vp": 2}, "breadth-first": {"vp": 2}}


# --- toy model and oracle ------------------------------------------------------------------------


def make_stage(position: int, seed_offset: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(1000 * seed_offset + position + 1)
    layer = nn.Linear(HIDDEN, HIDDEN, dtype=DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(HIDDEN, HIDDEN, generator=generator, dtype=DTYPE) * 0.6)
        layer.bias.copy_(torch.randn(HIDDEN, generator=generator, dtype=DTYPE) * 0.1)
    return nn.Sequential(layer, nn.Tanh())


def microbatch_input(microbatch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(50_000 + microbatch)
    return torch.randn(MICRO_BATCH, HIDDEN, generator=generator, dtype=DTYPE)


def oracle(
    num_positions: int, num_microbatches: int
) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Per-microbatch losses and per-position parameter gradients of the whole model."""
    stages = [make_stage(position) for position in range(num_positions)]
    losses = []
    for microbatch in range(num_microbatches):
        activation = microbatch_input(microbatch)
        for stage in stages:
            activation = stage(activation)
        loss = (activation**2).sum()
        losses.append(loss.item())
        (loss / num_microbatches).backward()
    return losses, [[parameter.grad for parameter in stage.parameters()] for stage in stages]


class ToyStages:
    """StageCallbacks over one rank's toy stages; up-pipeline copies start from other weights."""

    def __init__(
        self, layout: Placement, rank: int, loss_scale: float, sync: ReplicaGradSync | None = None
    ):
        self.layout = layout
        self.loss_scale = loss_scale
        self.sync = sync
        self.modules = {
            stage: make_stage(layout.position(stage), seed_offset=layout.pipeline_of(stage))
            for stage in layout.rank_stages[rank]
        }
        self.losses: dict[int, float] = {}
        self.reduced: list[int] = []
        self.released: list[tuple[int, int]] = []

    def forward(
        self, stage: int, microbatch: int, input_tensor: torch.Tensor | None
    ) -> torch.Tensor:
        activation = self.modules[stage](
            microbatch_input(microbatch) if input_tensor is None else input_tensor
        )
        if not self.layout.is_last(stage):
            return activation
        loss = (activation**2).sum()
        self.losses[microbatch] = loss.item()
        return loss * self.loss_scale

    def release_output(self, stage: int, microbatch: int, output_tensor: Tensor) -> None:
        self.released.append((stage, microbatch))

    def backward(
        self,
        stage: int,
        microbatch: int,
        input_tensor: Tensor | None,
        output_tensor: Tensor,
        output_grad: Tensor | None,
    ) -> Tensor | None:
        torch.autograd.backward(output_tensor, grad_tensors=output_grad)
        return None if input_tensor is None else input_tensor.grad

    def backward_input(
        self,
        stage: int,
        microbatch: int,
        input_tensor: Tensor | None,
        output_tensor: Tensor,
        output_grad: Tensor | None,
    ) -> Tensor | None:
        if input_tensor is None:
            return None
        (grad,) = torch.autograd.grad(
            output_tensor, input_tensor, grad_outputs=output_grad, retain_graph=True
        )
        return grad

    def backward_weight(
        self,
        stage: int,
        microbatch: int,
        input_tensor: Tensor | None,
        output_tensor: Tensor,
        output_grad: Tensor | None,
    ) -> None:
        parameters = list(self.modules[stage].parameters())
        torch.autograd.backward(output_tensor, grad_tensors=output_grad, inputs=parameters)

    def reduce_grad(self, stage: int) -> None:
        self.reduced.append(stage)
        if self.sync is not None:
            self.sync.start(self.modules[stage].parameters())


def make_buffer(action: Action) -> torch.Tensor:
    return torch.empty(MICRO_BATCH, HIDDEN, dtype=DTYPE)


# --- schedules ------------------------------------------------------------------------------------


def gpipe_order(
    name: str, layout: Placement, pipelines: tuple[int, ...], *, split: bool = False
) -> Schedule:
    """Forwards by (position, microbatch), backwards by (-position, microbatch); deadlock free on
    any placement. ``split``: I instead of B, each W one backward later."""
    programs = []
    for rank in range(layout.num_ranks):
        owned = [
            (stage, microbatch)
            for stage in layout.rank_stages[rank]
            for microbatch, pipeline in enumerate(pipelines)
            if layout.pipeline_of(stage) == pipeline
        ]
        program = [
            F(*key) for key in sorted(owned, key=lambda key: (layout.position(key[0]), key[1]))
        ]
        delayed = None
        for key in sorted(owned, key=lambda key: (-layout.position(key[0]), key[1])):
            if not split:
                program.append(B(*key))
                continue
            program.append(I(*key))
            if delayed is not None:
                program.append(W(*delayed))
            delayed = key
        if delayed is not None:
            program.append(W(*delayed))
        programs.append(tuple(program))
    return Schedule(name, layout, len(pipelines), pipelines, tuple(programs))


def _bitpipe_pipelines(num_ranks: int, num_microbatches: int) -> tuple[int, ...]:
    return tuple(
        0 if m % num_ranks < max(num_ranks // 2, 1) else 1 for m in range(num_microbatches)
    )


def case_builders(num_ranks: int) -> dict[str, Callable[[], Schedule]]:
    """Hand-built schedules first, then every registered one (same list in parent and workers)."""
    num_microbatches = 2 * num_ranks
    pipelines = _bitpipe_pipelines(num_ranks, num_microbatches)
    builders: dict[str, Callable[[], Schedule]] = {
        "hand-1f1b": lambda: one_f_one_b(num_ranks, num_microbatches),
        "hand-1f1b" + REVERSED: lambda: one_f_one_b(num_ranks, num_microbatches),
        "hand-v-gpipe": lambda: vshape_gpipe(num_ranks, num_microbatches),
        "hand-chimera-gpipe": lambda: bidirectional_gpipe(num_ranks, num_microbatches),
        "hand-bitpipe-gpipe": lambda: gpipe_order(
            "bitpipe-gpipe", placements.bitpipe(num_ranks), pipelines
        ),
        "hand-bitpipe-gpipe-iw": lambda: gpipe_order(
            "bitpipe-gpipe-iw", placements.bitpipe(num_ranks), pipelines, split=True
        ),
    }
    for name in registry.names():
        options = REGISTRY_OPTIONS.get(name, {})
        builders[name] = lambda name=name, options=options: registry.build(
            name, num_ranks, num_microbatches, **options
        )
    return builders


# --- one case on one rank -------------------------------------------------------------------------


def run_case(schedule: Schedule, rank: int, env: dict, *, reversed_ranks: bool = False) -> dict:
    """Run ``schedule`` as pipeline rank ``rank``, check it against the oracle; return facts.

    Only the pair group's broadcast and all-reduces are collectives here, so a rank that fails a
    check cannot leave the others in a mismatched collective; ``env["communicating"]`` is True
    while messages may be in flight. ``reversed_ranks``: p2p goes through a pipeline group whose
    rank r is global rank D-1-r.
    """
    lowered = lower(schedule)
    validate(lowered)
    layout = lowered.placement
    program = lowered.programs[rank]
    bidirectional = layout.num_pipelines == 2
    average = env["average"] and bidirectional
    sync = (
        ReplicaGradSync(env["pair_group"], average=average, timeout_s=CASE_TIMEOUT_S)
        if bidirectional
        else None
    )
    callbacks = ToyStages(layout, rank, (2.0 if average else 1.0) / lowered.num_microbatches, sync)
    if bidirectional:
        stage_parameters = {
            stage: list(module.parameters()) for stage, module in callbacks.modules.items()
        }
        broadcast_replica_parameters(layout, rank, stage_parameters, env["pair_group"])
    group, channels = env["group"], env["channels"]
    if reversed_ranks:
        group, channels = env["reversed_group"], None
        assert dist.get_global_rank(group, rank) == dist.get_rank() != rank
    p2p = P2P(layout, rank, make_buffer, group=group, channels=channels, timeout_s=CASE_TIMEOUT_S)
    executor = Executor(layout, rank, callbacks, p2p)

    # both communicating runs first, so that a failed check below leaves no message in flight
    env["communicating"] = True
    started = time.perf_counter()
    executor.run(program)
    if sync is not None:
        sync.finish()
    seconds = time.perf_counter() - started
    trace = [event.action for event in executor.trace]
    peak, live = executor.peak_live_activations, executor.live_activations
    training_losses = dict(callbacks.losses)
    callbacks.losses.clear()
    with torch.no_grad():
        executor.run(forward_program(program), forward_only=True)
    env["communicating"] = False

    assert trace == list(program), "trace differs from the program"
    expected_peak = simulate(lowered).peak_activations[rank]
    assert peak == expected_peak, f"peak stash {peak}, simulator says {expected_peak}"
    assert live == 0 and executor.peak_live_activations == 0
    expected_syncs = sorted(layout.rank_stages[rank]) if bidirectional else []
    assert sorted(callbacks.reduced) == expected_syncs
    assert callbacks.losses == training_losses, "forward-only losses differ"

    losses, grads = oracle(layout.stages_per_pipeline, lowered.num_microbatches)
    for microbatch, loss in training_losses.items():
        assert loss == pytest.approx(losses[microbatch], rel=1e-12), f"loss of mb {microbatch}"
    worst = 0.0
    for stage, module in callbacks.modules.items():
        for parameter, want in zip(module.parameters(), grads[layout.position(stage)], strict=True):
            assert parameter.grad is not None, f"stage {stage} has no gradient"
            worst = max(worst, ((parameter.grad - want).abs().max() / want.abs().max()).item())
            torch.testing.assert_close(
                parameter.grad, want, rtol=1e-9, atol=1e-12, msg=f"grad of stage {stage}"
            )
    return {
        "actions": len(program),
        "peak": expected_peak,
        "seconds": seconds,
        "worst_rel_grad_error": worst,
        "loss_microbatches": sorted(training_losses),
        "num_microbatches": lowered.num_microbatches,
    }


def timeout_probe(rank: int) -> str | None:
    """Rank 1 waits for an activation rank 0 never sends; return the error text (rank 1)."""
    probe_group = dist.new_group([0, 1])
    layout = placements.looped(2)
    channels = {(0, 1): probe_group, (1, 0): probe_group}
    program = (Action(1, Kind.RECV_F, 0), F(1, 0)) if rank == 1 else ()
    p2p = P2P(layout, rank, make_buffer, channels=channels, timeout_s=0.3)
    executor = Executor(layout, rank, ToyStages(layout, rank, 1.0), p2p)
    try:
        executor.run(program)
    except P2PTimeoutError as error:
        return str(error)
    return None


def build_within(build: Callable[[], Schedule], seconds: float) -> Schedule:
    """``build()``, or TimeoutError if the generator runs longer than ``seconds``."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"the generator did not finish within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return build()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _all_ranks(flag: bool) -> bool:
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return all(flags)


def _worker(rank: int, num_ranks: int, port: int, out_dir: str) -> None:
    """Run every case in order. A case that fails while messages may be in flight (any rank
    failed inside ``Executor.run`` or the replica sync) stops all later ones; a failed build or
    check does not. Results go to ``out_dir/rank{rank}.pkl``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=num_ranks, timeout=timedelta(seconds=60)
        )
        ring = {(r, (r + 1) % num_ranks) for r in range(num_ranks)}
        env = {
            "pair_group": replica_pair_groups(num_ranks),
            "average": num_ranks == 4,
            "group": dist.new_group(list(range(num_ranks))),
            "reversed_group": dist.new_group(list(reversed(range(num_ranks))), sort_ranks=False),
            "channels": None,
        }
        if num_ranks == 4:
            env["channels"] = build_channels(ring | {(b, a) for a, b in ring})
        broken = None
        for name, build in case_builders(num_ranks).items():
            if broken is not None:
                results[name] = {"ok": False, "error": f"not run: case {broken} failed before it"}
                continue
            try:
                schedule = build_within(build, BUILD_DEADLINE_S)
            except Exception:
                results[name] = {"ok": False, "error": "build failed: " + traceback.format_exc()}
            if not _all_ranks(name not in results):
                results.setdefault(name, {"ok": False, "error": "build failed on another rank"})
                continue
            try:
                if name.endswith(REVERSED):
                    facts = run_case(schedule, num_ranks - 1 - rank, env, reversed_ranks=True)
                else:
                    facts = run_case(schedule, rank, env)
                results[name] = {"ok": True, "facts": facts}
            except Exception:
                results[name] = {"ok": False, "error": traceback.format_exc()}
            if not _all_ranks(not env.pop("communicating", False)):
                broken = name
        if num_ranks == 2:
            results["timeout-probe"] = {"ok": True, "facts": {"message": timeout_probe(rank)}}
        dist.barrier()
    except Exception:
        results["worker"] = {"ok": False, "error": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
            pickle.dump(results, handle)
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(num_ranks: int, out_dir: str) -> list[dict[str, dict]]:
    context = mp.start_processes(
        _worker,
        args=(num_ranks, _free_port(), out_dir),
        nprocs=num_ranks,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"D={num_ranks} workers still running after {SPAWN_DEADLINE_S:g} s")
    results = []
    for rank in range(num_ranks):
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as handle:
            results.append(pickle.load(handle))
    return results


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[dict[str, dict]]]:
    cache: dict[int, list[dict[str, dict]]] = {}

    def get(num_ranks: int) -> list[dict[str, dict]]:
        if num_ranks not in cache:
            cache[num_ranks] = spawn(num_ranks, str(tmp_path_factory.mktemp(f"d{num_ranks}")))
        return cache[num_ranks]

    return get


def _case_ids() -> list[tuple[int, str]]:
    return [(num_ranks, name) for num_ranks in (2, 4) for name in case_builders(num_ranks)]


@pytest.mark.parametrize("num_ranks,name", _case_ids(), ids=[f"D{d}-{n}" for d, n in _case_ids()])
def test_schedule_matches_single_process_oracle(spawned, num_ranks: int, name: str) -> None:
    per_rank = spawned(num_ranks)
    for rank, results in enumerate(per_rank):
        if "worker" in results:
            pytest.fail(f"rank {rank} worker failed:\n{results['worker']['error']}")
        result = results[name]
        assert result["ok"], f"rank {rank}:\n{result['error']}"
    facts = [results[name]["facts"] for results in per_rank]
    owners = sorted(m for fact in facts for m in fact["loss_microbatches"])
    assert owners == list(range(facts[0]["num_microbatches"])), "each loss exactly once"


def test_timeout_names_rank_peer_and_action(spawned) -> None:
    per_rank = spawned(2)
    assert per_rank[0]["timeout-probe"]["facts"]["message"] is None
    message = per_rank[1]["timeout-probe"]["facts"]["message"]
    assert (
        message
        == "rank 1: timed out after 0.3 s waiting for RECV_F of stage 1 microbatch 0 from rank 0"
    )


# --- in-process checks (no spawn) ----------------------------------------------------------------


class _FailingWork:
    def __init__(self, text: str) -> None:
        self.text = text

    def wait(self, timeout: timedelta | None = None) -> bool:
        raise RuntimeError(self.text)

    def is_completed(self) -> bool:
        return False


def test_receive_timeout_error_with_mock_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        dist, "irecv", lambda *args, **kwargs: _FailingWork("Timed out waiting 50ms for recv")
    )
    p2p = P2P(placements.looped(4), 2, make_buffer, timeout_s=0.05)
    action = Action(2, Kind.RECV_F, 3)
    p2p.post_recv(action)
    with pytest.raises(P2PTimeoutError) as caught:
        p2p.wait_recv(action)
    assert (
        str(caught.value)
        == "rank 2: timed out after 0.05 s waiting for RECV_F of stage 2 microbatch 3 from rank 1"
    )


def test_failed_send_error_names_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        dist, "isend", lambda *args, **kwargs: _FailingWork("Connection closed by peer")
    )
    p2p = P2P(placements.vshape(2), 0, make_buffer)
    action = Action(
        3, Kind.SEND_B, 1
    )  # vshape(2): rank 0 holds stages 0 and 3, stage 2 is on rank 1
    p2p.send(action, torch.zeros(2))
    assert p2p.outstanding() == ["3SEND_B1 to rank 1"]
    with pytest.raises(
        P2PError, match=r"^rank 0: SEND_B of stage 3 microbatch 1 to rank 1 failed .*closed by peer"
    ):
        p2p.finish()


def _single_rank_run(schedule: Schedule) -> tuple[Executor, ToyStages]:
    lowered = lower(schedule)
    validate(lowered)
    callbacks = ToyStages(lowered.placement, 0, 1.0 / lowered.num_microbatches)
    if lowered.placement.num_pipelines == 2:
        for (
            stage,
            module,
        ) in callbacks.modules.items():  # one rank holds both replicas: copy down -> up
            if lowered.placement.pipeline_of(stage) == 1:
                module.load_state_dict(
                    callbacks.modules[lowered.placement.replica_of(stage)].state_dict()
                )
    executor = Executor(lowered.placement, 0, callbacks)
    executor.run(lowered.programs[0])
    assert [event.action for event in executor.trace] == list(lowered.programs[0])
    assert executor.peak_live_activations == simulate(lowered).peak_activations[0]
    return executor, callbacks


@pytest.mark.parametrize("split", [False, True])
def test_single_rank_bitpipe_hands_over_locally_and_matches_oracle(split: bool) -> None:
    layout = placements.bitpipe(1)
    schedule = gpipe_order("bitpipe-d1", layout, (0, 1, 1, 0), split=split)
    executor, callbacks = _single_rank_run(schedule)
    losses, grads = oracle(layout.stages_per_pipeline, 4)
    assert callbacks.losses == pytest.approx(dict(enumerate(losses)), rel=1e-12)
    program = lower(schedule).programs[0]
    assert callbacks.reduced == [
        action.stage for action in program if action.kind is Kind.REDUCE_GRAD
    ]
    for stage in (0, 1):
        replica = layout.replica_of(stage)
        down, up = callbacks.modules[stage].parameters(), callbacks.modules[replica].parameters()
        for d, u, want in zip(down, up, grads[stage], strict=True):
            torch.testing.assert_close(d.grad + u.grad, want, rtol=1e-12, atol=1e-14)
    assert [event.action for event in executor.trace] == list(program)


def test_left_over_state_is_reported() -> None:
    layout = placements.looped(1)
    executor = Executor(layout, 0, ToyStages(layout, 0, 1.0))
    with pytest.raises(
        RuntimeError,
        match=r"rank 0: the program ended with state left over: stashed activation of 0F0",
    ):
        executor.run((F(0, 0),))


def test_missing_receive_is_reported() -> None:
    layout = placements.looped(2)
    executor = Executor(layout, 1, ToyStages(layout, 1, 1.0), P2P(layout, 1, make_buffer))
    with pytest.raises(RuntimeError, match=r"rank 1: 1RECV_F0 was never posted"):
        executor.run((F(1, 0),))


def test_forward_only_rejects_backward_actions() -> None:
    layout = placements.looped(1)
    executor = Executor(layout, 0, ToyStages(layout, 0, 1.0))
    with pytest.raises(ValueError, match="forward-only run got 0B0"):
        executor.run((F(0, 0), B(0, 0)), forward_only=True)
