"""No hang, no wasted run, NaN handled like Megatron, replicas checked, training resumed exactly.

Faults are made on purpose with ``MEGATRON_BITPIPE_FAULT`` (``runtime.faults``): a rank is killed
(SIGKILL) or stopped (SIGSTOP) during set-up, in the middle of a step or at the optimizer step,
under torchrun and with the processes started by hand. Every survivor must be gone within the
deadline plus 10 s of the fault, having said in one line what it waited on.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
from runs import REPO, Trained
from runs import train as train_reported

from megatron_bitpipe.run_report import losses

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

STEP_TIMEOUT_S = 4.0
SETUP_TIMEOUT_S = 12.0
MODEL = (
    "--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
    "--micro-batch-size 2 --global-batch-size 8 --train-iters 3 --lr 1e-4 --seed 1234 "
    "--pipeline-model-parallel-size 2 --pipeline-schedule bitpipe "
    f"--distributed-timeout-minutes {SETUP_TIMEOUT_S / 60} --step-timeout-seconds {STEP_TIMEOUT_S}"
).split()
DEADLINES = {"setup": SETUP_TIMEOUT_S, "step": STEP_TIMEOUT_S, "optimizer": STEP_TIMEOUT_S}


@dataclass
class Outcome:
    """What a faulted run printed (seconds since launch, line) and how its processes ended."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    exits: dict[int, tuple[float, int]] = field(default_factory=dict)

    def first(self, text: str) -> tuple[float, str] | None:
        return next(((when, line) for when, line in self.lines if text in line), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _read(stream, rank: int, started: float, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((time.monotonic() - started, rank, line.rstrip("\n")))


def launch_with_fault(fault: str, *, torchrun: bool, until: str, limit_s: float) -> Outcome:
    """Two ranks of the trainer with ``fault``; collect output until ``until`` has been printed
    (torchrun) or every process but the faulted rank 1 has exited (by hand), then kill all."""
    env = {**os.environ, "MEGATRON_BITPIPE_FAULT": fault, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    trainer = ["-m", "megatron_bitpipe.train", *MODEL]
    if torchrun:
        launches = [(None, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node=2", *trainer], env)]
    else:
        port = str(_free_port())
        launches = [
            (rank, [sys.executable, *trainer],
             {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for rank in (0, 1)
        ]
    started = time.monotonic()
    output: queue.Queue = queue.Queue()
    processes = {}
    for rank, command, environment in launches:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        processes[rank] = process
        threading.Thread(target=_read, args=(process.stdout, rank, started, output), daemon=True).start()
    outcome = Outcome()
    try:
        while time.monotonic() - started < limit_s:
            try:
                when, _, line = output.get(timeout=0.2)
                outcome.lines.append((when, line))
            except queue.Empty:
                pass
            for rank, process in processes.items():
                if rank not in outcome.exits and process.poll() is not None:
                    outcome.exits[rank] = (time.monotonic() - started, process.returncode)
            if torchrun and (outcome.first(until) or None in outcome.exits):
                break
            if not torchrun and 0 in outcome.exits:
                break
    finally:
        for process in processes.values():
            _kill_tree(process)
    return outcome


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launched process and everything under it (torchrun's workers run in their own
    sessions; a stopped worker stays until killed)."""
    import psutil

    try:
        family = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


SCENARIOS = [
    (kind, point, torchrun)
    for torchrun in (True, False)
    for point in ("setup", "step", "optimizer")
    for kind in ("kill", "stop")
]


@pytest.mark.parametrize(
    "kind,point,torchrun",
    SCENARIOS,
    ids=[f"{kind}-at-{point}-{'torchrun' if t else 'by-hand'}" for kind, point, t in SCENARIOS],
)
def test_a_rank_that_dies_or_stops_makes_every_other_rank_exit_within_the_deadline(kind, point, torchrun):
    iteration = "" if point == "setup" else ":iteration=2"
    deadline = DEADLINES[point]
    outcome = launch_with_fault(
        f"{kind}@{point}:rank=1{iteration}", torchrun=torchrun, until="rank 0: ", limit_s=120
    )
    fault = outcome.first(f"fault: rank 1: {kind}@{point}")
    assert fault is not None, outcome.lines[-20:]
    said = [line for _, line in outcome.lines if line.startswith("rank 0: ")]
    if torchrun:
        line = outcome.first("rank 0: ")
        if line is None and kind == "kill":
            # torchrun saw its worker die and stopped the others before they spoke
            ended, status = outcome.exits[None]
            assert status != 0 and ended - fault[0] <= deadline + 10, (ended, fault)
            return
        assert line is not None, outcome.lines[-20:]
        assert line[0] - fault[0] <= deadline + 10, (line, fault)
    else:
        ended, status = outcome.exits[0]
        assert status != 0 and ended - fault[0] <= deadline + 10, (ended, fault)
    assert len(said) == 1, said
    expected = {  # what the line names: the phase, and the peer or the action
        "setup": r"rendezvous.*waiting for 1 other rank at [\w.]+:\d+",
        "step": r"(from|to) rank 1|step 2 failed \(action \d+[A-Z_]+\d*\)",
        "optimizer": r"optimizer step of iteration 2.*(the other ranks \[1\]|a peer is gone)",
    }[point]
    assert re.search(expected, said[0]), said


# --- settings, outputs, NaN, replicas, resume ------------------------------------------------------


def train(processes: int, *extra: str, fault: str | None = None, check: bool = True) -> Trained:
    env = {"MEGATRON_BITPIPE_FAULT": fault} if fault else None
    return train_reported(processes, list(extra), env=env, check=check)


BAD_SETTINGS = [
    (["--micro-batch-size", "0"], "--micro-batch-size 0: must be an integer >= 1"),
    (["--num-attention-heads", "0"], "--num-attention-heads 0: must be an integer >= 1"),
    (["--num-layers", "-4"], "--num-layers -4: must be an integer >= 1"),
    (["--global-batch-size", "0"], "--global-batch-size 0: must be an integer >= 1"),
    (["--train-iters", "0"], "--train-iters 0: must be an integer >= 1"),
    (["--pipeline-schedule", "none", "--train-iters", "0"], "--train-iters 0: must be an integer >= 1"),
    (["--eval-iters", "-1"], "--eval-iters -1: must be an integer >= 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number >= 0"),
    (["--lr", "-0.1"], "--lr -0.1: must be a finite number >= 0"),
    (["--adam-eps", "0"], "--adam-eps 0.0: must be a finite number > 0"),
    (["--clip-grad", "inf"], "--clip-grad inf: must be a finite number >= 0"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout 1.5: must be a number in [0, 1)"),
    (["--step-timeout-seconds", "0"], "--step-timeout-seconds 0.0: must be a finite number > 0"),
    (["--distributed-timeout-minutes", "nan"], "--distributed-timeout-minutes nan: must be a finite"),
    (["--trace", "out.png"], "--trace out.png: the name must end in .json"),
    (["--report", "run.txt"], "--report run.txt: the name must end in .json"),
    (["--trace", "/proc/nope/trace.json"], "--trace /proc/nope/trace.json: cannot write there"),
    (["--save-params", "/proc/nope/p.pt"], "--save-params /proc/nope/p.pt: cannot write there"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "bitpipe",
      "--global-batch-size", "6", "--world", "2"],
     "bitpipe: 3 microbatches per data-parallel rank must be a multiple of "
     "--pipeline-model-parallel-size 2"),
    (["--pipeline-model-parallel-size", "3", "--pipeline-schedule", "bitpipe-official",
      "--global-batch-size", "6", "--world", "3"],
     "bitpipe-official: --pipeline-model-parallel-size 3 must be even"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
]


def trainer_status(monkeypatch, argv: list[str], *, world: str = "1", training=None) -> int:
    """``megatron_bitpipe.train.main(argv)`` in this process, as rank 0 of ``world`` ranks (the
    variables torchrun sets, so main sets none), with ``training(args, plans)`` in place of the
    training itself (by default: the test fails); its exit status."""
    from megatron_bitpipe import train as trainer
    from megatron_bitpipe.mcore import training as mcore_training
    from megatron_bitpipe.scale.bench import PIN_VARIABLE

    def must_not_train(args, plans):
        raise AssertionError("the trainer got past its checks to the training")

    monkeypatch.setattr(mcore_training, "run", training or must_not_train)
    for name, value in {"WORLD_SIZE": world, "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(PIN_VARIABLE, raising=False)  # the pinning is the process's, not the test's
    try:
        return trainer.main(argv)
    except SystemExit as stopped:
        return stopped.code


@pytest.mark.parametrize("extra,message", BAD_SETTINGS, ids=[" ".join(e) for e, _ in BAD_SETTINGS])
def test_every_bad_setting_is_one_line_naming_it_before_any_process_group(extra, message, monkeypatch,
                                                                           capsys, tmp_path):
    """``--world N`` in the table is the WORLD_SIZE the command runs under (default 1)."""
    world = extra[extra.index("--world") + 1] if "--world" in extra else "1"
    extra = [token for index, token in enumerate(extra)
             if token != "--world" and (index == 0 or extra[index - 1] != "--world")]
    monkeypatch.chdir(tmp_path)
    assert trainer_status(monkeypatch, extra, world=world) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron_bitpipe.train: error: "), lines
    assert message in lines[0]


def test_missing_output_folders_are_created_before_training(tmp_path, monkeypatch):
    trace = tmp_path / "new" / "folder" / "trace.json"
    saved = tmp_path / "other" / "params.pt"
    folders_at_the_start = []

    def training(args, plans):
        folders_at_the_start.append((trace.parent.is_dir(), saved.parent.is_dir()))
        return 0

    argv = [*MODEL, "--trace", str(trace), "--save-params", str(saved)]
    assert trainer_status(monkeypatch, argv, world="2", training=training) == 0
    assert folders_at_the_start == [(True, True)]


def test_a_nan_loss_skips_that_step_on_every_rank_and_is_counted():
    """A NaN in one microbatch's loss (on the rank that computes it): the step is skipped on
    both replicas, counted as Megatron counts it, and training goes on from the same weights."""
    clean = losses(train(2, *MODEL, "--train-iters", "4").only)
    faulted = train(2, *MODEL, "--train-iters", "4", "--pipeline-schedule", "bitpipe,chimera,1f1b",
                    fault="nan@loss:iteration=2:microbatch=3")
    said = " iteration 2: lm loss nan is not finite: the update is skipped on every rank"
    assert faulted.log.count(said) == 3
    assert faulted.log.count("lm loss: NAN |") == 3  # Megatron's line, which counts it
    assert faulted.log.count("number of skipped iterations:   1 | number of nan iterations:   1 |") == 3
    assert list(faulted.schedules) == ["bitpipe", "chimera", "1f1b"]
    for schedule, entry in faulted.schedules.items():
        iterations = entry["iterations"]
        assert len(iterations) == 4, schedule
        assert iterations[1]["lm_loss"] is None and iterations[1]["nan"] and iterations[1]["skipped"]
        first, third, fourth = losses(entry)  # iteration 2's is not finite
        assert first == pytest.approx(clean[0], rel=1e-6)
        # iteration 3 starts from iteration 1's weights (2's update was skipped), finite
        assert third != pytest.approx(clean[2], rel=1e-6) and 4.0 < third < 4.3, schedule
        assert 4.0 < fourth < 4.3, schedule
        assert entry["replicas_identical"] or schedule == "1f1b"


def test_exit_on_nan_stops_with_the_iteration_and_the_loss():
    result = train(2, *MODEL, "--exit-on-nan", fault="nan@loss:iteration=2:microbatch=1", check=False).result
    assert result.returncode != 0
    assert "iteration 2: lm loss nan is not finite; stopping (--exit-on-nan)" in result.stderr


def test_replica_check_catches_a_perturbed_copy_and_names_the_stage():
    quiet = train(2, *MODEL, "--check-replicas-every", "1").log
    assert quiet.count("the copies of every stage are bitwise identical") == 3
    result = train(2, *MODEL, "--check-replicas-every", "2", fault="perturb@parameters:rank=1:iteration=2",
                   check=False).result
    assert result.returncode != 0
    assert "iteration 2: stage " in result.stderr and "differs between the ranks [0, 1]" in result.stderr


def test_training_killed_mid_run_resumes_from_the_last_checkpoint_bitwise(tmp_path):
    """4 ranks of bitpipe, checkpoints every 2 iterations, rank 2 killed at iteration 5: the
    restart from iteration 4 reports the losses of the uninterrupted run, bit for bit (the killed
    run's report holds the iterations it logged)."""
    # checkpoint saves get the setup deadline: a minute, for a first save's writer processes
    # importing a CUDA build of torch on two loaded cores (12 s was too short there)
    arguments = [*MODEL, "--pipeline-model-parallel-size", "4", "--global-batch-size", "16",
                 "--num-layers", "8", "--train-iters", "6", "--distributed-timeout-minutes", "1"]
    uninterrupted = losses(train(4, *arguments).only)
    folder = tmp_path / "checkpoints"
    crashed = train(4, *arguments, "--save", str(folder), "--save-interval", "2",
                    fault="kill@step:rank=2:iteration=5", check=False)
    assert crashed.result.returncode != 0
    assert crashed.report is not None and not crashed.report["complete"]
    assert (folder / "latest_checkpointed_iteration.txt").read_text() == "4"
    resumed = train(4, *arguments, "--load", str(folder), "--save", str(folder), "--save-interval", "2")
    assert [record["iteration"] for record in resumed.only["iterations"]] == [5, 6]
    assert losses(crashed.only)[:4] + losses(resumed.only) == uninterrupted


def test_a_checkpoint_cut_short_is_never_the_one_loaded(tmp_path):
    folder = tmp_path / "checkpoints"
    result = train(2, *MODEL, "--save", str(folder), "--save-interval", "1",
                   fault="kill@save:rank=1:iteration=2", check=False).result
    assert result.returncode != 0
    assert (folder / "iter_0000002").exists()
    assert (folder / "latest_checkpointed_iteration.txt").read_text() == "1"
    resumed = train(2, *MODEL, "--load", str(folder)).log
    assert "loaded checkpoint from" in resumed and "at iteration 1" in resumed


def test_fault_specs_are_read_strictly():
    from megatron_bitpipe.runtime import faults

    assert faults.parse("kill@step:rank=1:iteration=2") == [faults.Fault("kill", "step", 1, 2)]
    for bad in ("explode@step", "kill", "kill@step:rank=x"):
        with pytest.raises(ValueError, match="MEGATRON_BITPIPE_FAULT: cannot read"):
            faults.parse(bad)


def test_deadline_names_the_phase_and_what_it_waits_on():
    from megatron_bitpipe.runtime.deadline import Deadline

    said: list[str] = []
    done = threading.Event()
    deadline = Deadline(3, poll_s=0.01, on_expire=lambda line: (said.append(line), done.set()))
    with deadline.phase("step 7", 0.05, waiting=lambda: "RECV_F of stage 2 microbatch 0 from rank 2"):
        assert done.wait(5)
    assert said == [
        "rank 3: step 7 made no progress within 0.05 s, waiting for RECV_F of stage 2 microbatch 0 "
        "from rank 2; stopping this rank"
    ]


def test_deadline_restarts_its_clock_while_the_phase_makes_progress():
    from megatron_bitpipe.runtime.deadline import Deadline

    said: list[str] = []
    deadline = Deadline(0, poll_s=0.01, on_expire=said.append)
    ticks = iter(range(10**6))
    counter = {"value": 0}
    with deadline.phase("step 1", 0.1, progress=lambda: counter["value"]):
        for _ in range(30):
            counter["value"] = next(ticks)
            time.sleep(0.01)
    deadline.close()
    assert said == []


def test_a_peer_gone_is_one_line_not_a_gloo_dump():
    from megatron_bitpipe.runtime.errors import backend_reason

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
        "[127.0.0.1]:55686: Connection reset by peer. This is typically caused by a remote worker"
    )
    assert backend_reason(gloo) == "a peer is gone (Connection reset by peer)"
    timeout = RuntimeError("[x/unbound_buffer.cc:129] Timed out waiting 15000ms for send operation")
    assert backend_reason(timeout).startswith("timed out after 15 s waiting for a send")


CLI_REFUSALS = [
    (["simulate", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--cost-f", "inf"],
     "argument --cost-f: must be a finite number > 0, got inf"),
    (["render", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--out", "/proc/x.png"],
     "--out /proc/x.png: cannot write there"),
    (["plan", "--schedule", "1f1b", "--pp", "1024", "--microbatches", "100000"],
     "would be a plan of about 6.1e+08 actions (~172 GiB to build); the limit is 1e+07 actions"),
]


@pytest.mark.parametrize("argv,message", CLI_REFUSALS, ids=[argv[0] for argv, _ in CLI_REFUSALS])
def test_the_planning_cli_refuses_in_one_line_and_status_2(argv, message, capsys):
    from megatron_bitpipe import cli

    started = time.monotonic()
    try:
        status = cli.main(argv)
    except SystemExit as stopped:
        status = stopped.code
    assert status == 2 and time.monotonic() - started < 30
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
