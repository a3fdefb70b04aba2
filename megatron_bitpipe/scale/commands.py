"""The ``launch``, ``sweep``, ``recommend`` and ``bench`` subcommands of ``megatron-bitpipe``.

Each is a pair: ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> exit status``. A bad
config or setting raises ``ValueError`` (``ConfigError`` is one), which the CLI prints as one line
with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from megatron_bitpipe import train_args
from megatron_bitpipe.scale import bench, bench_report, config, measured_costs, recommend, slurm, sweep
from megatron_bitpipe.scale.cost_model import GIB, Prediction, predict
from megatron_bitpipe.schedules.choice import ScheduleChoice
from megatron_bitpipe.schedules.choice import parse as choice_list

TRAINER_SIZES = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                 "micro_batch_size", "global_batch_size")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a launch config (configs/launch/*.yaml)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--slurm", action="store_true", help="write the sbatch script (--out)")
    mode.add_argument("--print", action="store_true", help="print the sbatch script, write nothing")
    mode.add_argument("--local", action="store_true", help="run the same command here (torchrun --standalone)")
    parser.add_argument("--out", help="with --slurm: the script's path (default jobs/<job name>.sbatch)")
    parser.add_argument("--submit", action="store_true", help="with --slurm: also sbatch it")


def run_launch(args: argparse.Namespace) -> int:
    launch = config.load_launch(args.config)
    if args.local:
        command = slurm.local_command(launch)
        print("$ " + shlex.join(command), flush=True)
        return subprocess.call(command, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    script = slurm.sbatch_script(launch, source=str(args.config))
    if args.print:
        print(script, end="")
        return 0
    if args.submit:
        _require_sbatch()
    path = Path(args.out or f"jobs/{slurm.job_name(launch)}.sbatch")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"wrote {path}; submit with: sbatch {path}")
    return subprocess.call(["sbatch", str(path)]) if args.submit else 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a sweep config (configs/sweeps/*.yaml)")
    parser.add_argument("--out", help="results folder (default sweep-<config name>)")
    parser.add_argument("--submit", action="store_true", help="write and sbatch one job per fitting point")
    parser.add_argument("--dry-run", action="store_true", help="with --submit: print the jobs instead")
    parser.add_argument("--run-local", action="store_true",
                        help="also run the points that fit on this machine (CPU processes) and add "
                             "the measured figures")
    parser.add_argument("--max-processes", type=int, default=os.cpu_count() or 1,
                        help="with --run-local: the most processes one point may use")


def run_sweep(args: argparse.Namespace) -> int:
    plan = config.load_sweep(args.config)
    out = Path(args.out or f"sweep-{Path(args.config).stem}")
    out.mkdir(parents=True, exist_ok=True)
    if args.submit and not args.dry_run:
        _require_sbatch()
    points = sweep.expand(plan)
    predictions = sweep.predict_all(plan, points, progress=lambda line: print(line, flush=True))
    measured = _run_locally(plan, predictions, args.max_processes) if args.run_local else {}
    table = sweep.rows(predictions, measured)
    sweep.write_csv(out / "results.csv", table)
    written = [out / "results.csv"]
    try:
        written += sweep.plot(out, predictions, f"{plan.model.name} on {plan.cluster.name}")
    except ImportError:
        print("sweep: no plots (pip install matplotlib)")
    fitting = [p for p in predictions if p.fits]
    print(f"sweep: {len(fitting)} of {len(predictions)} points fit; wrote {', '.join(map(str, written))}")
    _print_best(fitting)
    if args.submit:
        _submit(plan, fitting, out, dry_run=args.dry_run)
    return 0


def _print_best(fitting: list[Prediction]) -> None:
    best: dict[str, Prediction] = {}
    for prediction in fitting:
        name = prediction.layout.schedule
        if name not in best or prediction.tokens_per_s > best[name].tokens_per_s:
            best[name] = prediction
    if not best:
        return
    print(f"{'schedule':<18}{'best layout':<42}{'tokens/s':>12}{'GiB':>8}")
    for name, prediction in sorted(best.items(), key=lambda item: -item[1].tokens_per_s):
        label = f"{prediction.layout.label()} N={prediction.microbatches}"
        print(f"{name:<18}{label:<42}{prediction.tokens_per_s:>12,.0f}{prediction.peak_memory_bytes / GIB:>8.1f}")


def _submit(plan: config.SweepConfig, fitting: list[Prediction], out: Path, *, dry_run: bool) -> None:
    jobs = out / "jobs"
    jobs.mkdir(exist_ok=True)
    for prediction in fitting:
        point = sweep.Point(prediction.layout, prediction.microbatches)
        launch = sweep.launch_config(plan, point)
        script = slurm.sbatch_script(launch, source=f"sweep point {point.label()}")
        path = jobs / f"{point.label()}.sbatch"
        if dry_run:
            print(f"# --- {path} (dry run: not written, not submitted)\n{script}", end="")
            continue
        path.write_text(script)
        subprocess.run(["sbatch", str(path)], check=True)


def _run_locally(plan: config.SweepConfig, predictions: list[Prediction], max_processes: int) -> dict:
    """Run the fitting points of at most ``max_processes`` processes, one launch per layout."""
    groups: dict[tuple, list[Prediction]] = {}
    for prediction in predictions:
        if prediction.fits and prediction.layout.world_size <= max_processes:
            key = (replace(prediction.layout, schedule=""), prediction.microbatches)
            groups.setdefault(key, []).append(prediction)
    measured = {}
    iterations = int(plan.launch.get("train_iters", 4))
    for index, ((layout, microbatches), members) in enumerate(groups.items(), 1):
        schedules = [member.layout.schedule for member in members]
        point = sweep.Point(replace(layout, schedule=",".join(schedules)), microbatches)
        print(f"run-local [{index}/{len(groups)}] {point.label()}: {layout.world_size} processes", flush=True)
        model = members[0].model
        launch = sweep.launch_config(plan, sweep.Point(members[0].layout, microbatches))
        trainer = replace(launch, launcher="trainer", train_iters=max(iterations, 3))
        arguments = _without(slurm.training_arguments(trainer), "--pipeline-schedule")
        figures = bench.run_schedules(layout.world_size, schedules, arguments,
                                      model.global_batch_size * model.seq_length)
        for member in members:
            found = figures[member.layout.schedule]
            measured[sweep.Point(member.layout, microbatches)] = found.figures()
            print(f"  {member.layout.schedule}: measured {found.median_ms:.1f} ms "
                  f"({found.tokens_per_s:,.0f} tokens/s), simulated {member.step_ms:.1f} ms", flush=True)
    return measured


def _without(arguments: list[str], flag: str) -> list[str]:
    index = arguments.index(flag)
    return arguments[:index] + arguments[index + 2:]


def add_recommend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model config (configs/models/*.yaml)")
    parser.add_argument("--cluster", required=True, help="a cluster config (configs/clusters/*.yaml)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs to use")
    parser.add_argument("--top", type=int, default=8, help="runners-up to show")
    parser.add_argument("--breakdown", action="store_true",
                        help="also the best layout of every schedule with its predicted step split into "
                        "compute, pipeline idle, replica sync, data-parallel all-reduce, optimizer and the rest")
    parser.add_argument("--write-launch", metavar="FILE",
                        help="write the winner as a launch config (then: megatron-bitpipe launch FILE --slurm)")


def run_recommend(args: argparse.Namespace) -> int:
    model, cluster = config.load_model(args.model), config.load_cluster(args.cluster)
    if args.gpus % cluster.gpus_per_node and args.gpus > cluster.gpus_per_node:
        raise ValueError(f"--gpus {args.gpus}: must be whole nodes of {cluster.gpus_per_node} GPUs")
    found = recommend.recommend(model, cluster, args.gpus)
    winner = found.winner
    print(f"recommend: {model.name} on {args.gpus} GPUs of {cluster.name}, global batch "
          f"{model.global_batch_size} x {model.seq_length} tokens; {len(found.ranked)} layouts fit, "
          f"{len(found.left_out)} do not (simulated, not measured)")
    if winner is None:
        print("no layout fits in memory; the closest:")
        for prediction in sorted(found.left_out, key=lambda p: p.peak_memory_bytes or 1 << 62)[:args.top]:
            print(f"  {prediction.layout.label()}: {recommend.why_slower(prediction, prediction)}")
        return 1
    print(f"\nfastest: {winner.layout.label()} with {winner.microbatches} microbatches per step: "
          f"{winner.step_ms:.0f} ms per step, {winner.tokens_per_s:,.0f} tokens/s, bubble "
          f"{100 * winner.bubble:.1f}%, {winner.peak_memory_bytes / GIB:.1f} of "
          f"{winner.memory_limit_bytes / GIB:.0f} GiB usable")
    print(f"\n{'rank':<6}{'layout':<42}{'N':>5}{'tokens/s':>12}{'GiB':>7}  why it lost")
    for rank, prediction in enumerate(found.ranked[: args.top + 1], 1):
        why = "fastest" if prediction is winner else recommend.why_slower(prediction, winner)
        print(f"{rank:<6}{prediction.layout.label():<42}{prediction.microbatches:>5}"
              f"{prediction.tokens_per_s:>12,.0f}{prediction.peak_memory_bytes / GIB:>7.1f}  {why}")
    if args.breakdown:
        _print_breakdown(found)
    oom = [p for p in found.left_out if p.invalid is None]
    if oom:
        closest = max(oom, key=lambda p: p.tokens_per_s)
        print(f"      (fastest that does not fit: {closest.layout.label()}, "
              f"{recommend.why_slower(closest, winner)})")
    launch = config.LaunchConfig.for_layout(model, cluster, winner.layout)
    text = _launch_yaml(args.model, args.cluster, launch)
    if args.write_launch:
        path = Path(args.write_launch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"\nwrote {path}: launch it with `megatron-bitpipe launch {path} --slurm`")
    else:
        print("\nlaunch it: save this as winner.yaml (or give --write-launch), then "
              "`megatron-bitpipe launch winner.yaml --slurm`")
        print(text, end="")
    print("\nor on each node (torchrun; the rendezvous on the first node):")
    command = slurm.training_command(launch)
    torchrun = [command[0], "-m", "torch.distributed.run", f"--nnodes={launch.nodes}",
                f"--nproc-per-node={launch.node_gpus}", "--rdzv-backend=c10d",
                "--rdzv-endpoint=$MASTER_ADDR:29500", *command[1:]]
    print("  " + " ".join(torchrun))
    return 0


def _print_breakdown(found: recommend.Recommendation) -> None:
    """The best layout of each schedule and its predicted step by part (ms)."""
    parts = recommend.BREAKDOWN_PARTS
    print(f"\nbest layout of each schedule, predicted step by part (ms; replica sync is the syncs' own "
          f"time per rank, hidden in the pipeline where they overlap):")
    print(f"{'layout':<42}{'step':>8}" + "".join(f"{part:>15}" for part in parts))
    for prediction in recommend.best_per_schedule(found):
        figures = recommend.breakdown(prediction)
        print(f"{prediction.layout.label():<42}{prediction.step_ms:>8.0f}"
              + "".join(f"{figures[part]:>15.0f}" for part in parts))


def _launch_yaml(model_path: str, cluster_path: str, launch: config.LaunchConfig) -> str:
    """A launch config file for ``launch`` (model and cluster by absolute path)."""
    lines = [f"# megatron-bitpipe recommend's winner: {launch.layout().label()}",
             f"model: {os.path.abspath(model_path)}", f"cluster: {os.path.abspath(cluster_path)}",
             f"schedule: {launch.schedule}", f"pipeline_parallel: {launch.pipeline_parallel}",
             f"nodes: {launch.nodes}"]
    if launch.tensor_parallel > 1:
        lines.append(f"tensor_parallel: {launch.tensor_parallel}")
    if launch.virtual_stages is not None:
        lines.append(f"virtual_stages: {launch.virtual_stages}")
    if launch.pipeline_rank_order != "consecutive":
        lines.append(f"pipeline_rank_order: {launch.pipeline_rank_order}")
    if launch.node_gpus != launch.cluster.gpus_per_node:
        lines.append(f"gpus_per_node: {launch.node_gpus}")
    return "".join(f"{line}\n" for line in lines)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc-per-node", type=int, required=True, help="processes (CPU ranks or GPUs)")
    parser.add_argument("--pipeline-schedule", required=True, help="schedules to run, comma separated")
    parser.add_argument("--out", required=True, help="folder for bench.csv, bench.md, costs.json, timelines")
    parser.add_argument("--repeat", type=int, default=1,
                        help="trainer runs, the schedule order reversed every other run; figures are "
                        "medians over runs (default 1)")
    parser.add_argument("--cost-basis", choices=measured_costs.BASES, default="wall",
                        help="what an action costs for the fitted simulator: its span less its wait for "
                        "messages (wall), or its process CPU time (cpu: right with more ranks than cores, "
                        "where the simulated step is the figure to read)")
    parser.add_argument("--cluster", help="also the cluster config's prediction (simulated_cluster_ms)")


def run_bench(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise ValueError(f"--repeat {args.repeat} must be >= 1")
    trainer_args = list(args.passthrough)
    known, _ = train_args.build_parser().parse_known_args(trainer_args)
    schedules = [choice.name for choice in choice_list(args.pipeline_schedule)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = known.global_batch_size * known.seq_length
    cores = bench.usable_cores()
    print(f"bench: {', '.join(schedules)} on {args.nproc_per_node} processes ({cores} cores), "
          f"{args.repeat} run(s) of {known.train_iters} iterations each (timed: all but the warm-up "
          f"and the memory-measured last)", flush=True)
    profiles = out / "profiles"
    runs = bench.run_repeated(args.nproc_per_node, schedules, trainer_args, tokens, args.repeat, str(profiles))
    report = bench_report.build(schedules, runs, profiles, args.cost_basis)
    if args.cluster:
        simulated = _simulated(args, known, schedules)
        header = list(report.header)
        header.insert(header.index("error_pct") + 1, "simulated_cluster_ms")
        for row in report.rows:
            predicted = simulated.get(row["schedule"])
            row["simulated_cluster_ms"] = f"{predicted:.1f}" if predicted else ""
        report = replace(report, header=header)
    sweep.write_csv(out / "bench.csv", report.rows, report.header)
    text = bench_report.markdown(report, _bench_note(args, cores))
    (out / "bench.md").write_text(text)
    written = [out / "bench.csv", out / "bench.md"]
    if report.costs is not None:
        measured_costs.save(report.costs, out / "costs.json")
        written.append(out / "costs.json")
    written += bench_report.write_timelines(profiles, args.repeat, schedules, out)
    print(text, end="")
    written = ", ".join(str(path) for path in written)
    print(f"bench: wrote {written}")
    return 0


def _bench_note(args: argparse.Namespace, cores: int) -> str:
    basis = "process CPU time" if args.cost_basis == "cpu" else "span less message waits"
    note = (f"simulated_ms: the simulator fed with the costs measured in these runs ({basis}; "
            f"costs.json), plus the measured optimizer step and the rest of an iteration; "
            f"error_pct against the measured median.")
    if args.nproc_per_node > cores:
        note += (f" {args.nproc_per_node} ranks share {cores} cores: the measured steps time the OS "
                 f"scheduler, so read simulated_ms (costs measured, step simulated), not the step.")
    return note


def _simulated(args: argparse.Namespace, known: argparse.Namespace, schedules: list[str]) -> dict[str, float]:
    cluster = config.load_cluster(args.cluster)
    pp, tp = known.pipeline_model_parallel_size, known.tensor_model_parallel_size
    dp = args.nproc_per_node // (pp * tp)
    model = config.ModelConfig(name="bench", precision="bf16" if known.bf16 else "fp32",
                               **{key: getattr(known, key) for key in TRAINER_SIZES})
    microbatches = known.global_batch_size // (known.micro_batch_size * dp)
    found = {}
    vp = known.virtual_pipeline_model_parallel_size
    for name in schedules:
        choice = ScheduleChoice(name)
        takes_vp = choice.uses_registry and choice.takes_virtual_size
        layout = config.Layout(name, pp, tp, dp, vp if takes_vp else None)
        prediction = predict(model, cluster, layout, microbatches)
        if prediction.invalid is None:
            found[name] = prediction.step_ms
    return found


def _require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise ValueError("--submit needs Slurm's sbatch on PATH (use --dry-run to print the jobs)")


COMMAND_SPECS = (
    ("launch", "write, print or run a launch config's job (Slurm sbatch or torchrun here)",
     add_launch_arguments, run_launch, False),
    ("sweep", "simulate a grid of layouts: results.csv, plots, optional Slurm jobs or local runs",
     add_sweep_arguments, run_sweep, False),
    ("recommend", "the fastest schedule and layout that fits, with the runners-up and why",
     add_recommend_arguments, run_recommend, False),
    ("bench", "real training runs of several schedules here: step times, tokens/s, memory",
     add_bench_arguments, run_bench, True),
)
"""(name, help, add_arguments, run, passes unknown arguments on to the trainer)."""
