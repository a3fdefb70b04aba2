"""Launching at scale: typed configs, the cost model, sweeps, recommend, Slurm scripts, local runs.

Planning tests need no torch; three tests start real CPU runs (launch --local, bench, sweep
--run-local) and compare what they print with what they were asked to do.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_bitpipe import cli
from megatron_bitpipe.scale import config, cost_model, recommend, slurm, sweep
from megatron_bitpipe.scale.config import ConfigError, Layout
from megatron_bitpipe.schedules import rank_order

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def model_yaml(**overrides: object) -> str:
    fields = {"name": "m", "num_layers": 8, "hidden_size": 64, "num_attention_heads": 4,
              "seq_length": 32, "global_batch_size": 16, **overrides}
    return "".join(f"{key}: {value}\n" for key, value in fields.items())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_config_loads(path):
    loader = {"models": config.load_model, "clusters": config.load_cluster,
              "sweeps": config.load_sweep, "launch": config.load_launch}[path.parent.name]
    assert loader(path) is not None


def test_every_config_field_has_a_docstring():
    for kind, docs in config.FIELD_DOCS.items():
        names = [item.name for item in config.fields(kind)]
        assert sorted(docs) == sorted(names), kind.__name__


BAD_MODELS = {
    "unknown key": (model_yaml(hiden_size=64), "unknown key 'hiden_size'"),
    "wrong type": (model_yaml(num_layers="eight"), "num_layers: expected int, got str 'eight'"),
    "bool for int": (model_yaml(num_layers="true"), "num_layers: expected int, got bool True"),
    "missing key": ("name: m\nnum_layers: 8\n", "missing key 'hidden_size'"),
    "zero size": (model_yaml(seq_length=0), "seq_length: 0 must be positive"),
    "heads do not divide": (model_yaml(num_attention_heads=5), "hidden_size: 64 must be divisible by num_attention_heads 5"),
    "batch not a multiple": (model_yaml(micro_batch_size=3), "global_batch_size: 16 must be a multiple of micro_batch_size 3"),
    "unknown precision": (model_yaml(precision="fp8"), "precision: 'fp8' must be one of bf16, fp16, fp32"),
    "not a mapping": ("- 1\n- 2\n", "expected a mapping of ModelConfig keys, got list"),
    "not yaml": ("name: [unclosed\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_a_bad_model_config_is_one_line_naming_file_key_and_rule(case, tmp_path):
    text, expected = BAD_MODELS[case]
    path = write(tmp_path, "model.yaml", text)
    with pytest.raises(ConfigError) as error:
        config.load_model(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_nested_configs_resolve_by_name_and_errors_name_the_nested_file(tmp_path):
    write(tmp_path, "models/m.yaml", model_yaml(vocab_size=-1))
    write(tmp_path, "clusters/c.yaml", "name: c\ngpus_per_node: 4\ngpu_memory_gib: 8\nintra_node_gbps: 10\n"
                                      "inter_node_gbps: 1\nachieved_tflops: 1\n")
    sweep_file = write(tmp_path, "sweeps/s.yaml", "model: m\ncluster: c\nschedules: [1f1b]\n"
                                                  "pipeline_parallel: [2]\nmicrobatches: [4]\n")
    with pytest.raises(ConfigError, match=r"models/m.yaml: vocab_size: -1 must be positive"):
        config.load_sweep(sweep_file)


def test_sweep_launch_settings_are_checked_against_the_launch_config(tmp_path):
    path = write(tmp_path, "sweeps/s.yaml", f"model: {CONFIGS}/models/tiny-demo.yaml\n"
                 f"cluster: {CONFIGS}/clusters/local-cpu.yaml\nschedules: [1f1b]\npipeline_parallel: [2]\n"
                 "microbatches: [4]\nlaunch: {nodez: 2}\n")
    with pytest.raises(ConfigError, match="launch: unknown launch setting 'nodez'"):
        config.load_sweep(path)


def test_a_gpu_kind_stands_in_for_measured_costs(tmp_path):
    path = write(tmp_path, "c.yaml", "name: c\ngpus_per_node: 8\ngpu_memory_gib: 131\nintra_node_gbps: 300\n"
                                     "inter_node_gbps: 45\ngpu: h200\n")
    cluster = config.load_cluster(path)
    assert cluster.layer_costs == str(CONFIGS / "h200_layer_costs.json") and cluster.achieved_tflops is None
    with pytest.raises(ConfigError, match="gpu: 'tpu' must be one of h100, h200, a100, cpu"):
        config.load_cluster(write(tmp_path, "d.yaml", path.read_text().replace("h200", "tpu")))


def test_cli_prints_a_config_error_as_one_line_with_exit_2(tmp_path, capsys):
    path = write(tmp_path, "model.yaml", model_yaml(hidden_size="big"))
    cluster = CONFIGS / "clusters" / "h100-8gpu-nodes.yaml"
    status = cli.main(["recommend", "--model", str(path), "--cluster", str(cluster), "--gpus", "8"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1
    assert error.startswith(f"megatron-bitpipe: error: {path}: hidden_size: expected int")


def test_replica_pairs_order_is_the_official_permutation_and_its_own_inverse():
    assert [rank_order.slot_of(rank, 8, "replica-pairs") for rank in range(8)] == [0, 7, 2, 5, 4, 3, 6, 1]
    for pp in (2, 4, 8, 16):
        slots = [rank_order.slot_of(rank, pp, "replica-pairs") for rank in range(pp)]
        assert sorted(slots) == list(range(pp))
        assert all(rank_order.slot_of(slot, pp, "replica-pairs") == rank for rank, slot in enumerate(slots))
        assert all(abs(slots[rank] - slots[pp - 1 - rank]) == 1 for rank in range(pp))


def test_replica_pairs_keeps_tensor_and_data_parallel_indices_and_refuses_odd_pp():
    assert rank_order.logical_global_rank(1 * 4 + 3, 4, 4, "replica-pairs") == 3 * 4 + 3
    assert rank_order.logical_global_rank(5, 4, 4, "consecutive") == 5
    with pytest.raises(ValueError, match="needs an even --pipeline-model-parallel-size"):
        rank_order.check_order("replica-pairs", 3)


@pytest.fixture(scope="module")
def paper() -> tuple[config.ModelConfig, config.ClusterConfig]:
    return (config.load_model(CONFIGS / "models" / "paper-gpt.yaml"),
            config.load_cluster(CONFIGS / "clusters" / "h100-8gpu-nodes.yaml"))


def test_measured_layer_costs_are_used_when_the_model_has_a_row(paper):
    costs = cost_model.layer_costs(*paper)
    assert (costs.forward_ms, costs.backward_ms) == (1.455, 2.265)
    assert costs.source.startswith("measured")


def test_models_without_a_row_are_scaled_by_flops(paper):
    model = replace(paper[0], hidden_size=6144, num_attention_heads=48)
    costs = cost_model.layer_costs(model, paper[1])
    assert costs.source.startswith("scaled by FLOPs from GPT-3 13B-like")  # the nearest hidden size
    flops = 1024 * (24 * 6144**2 + 4 * 1024 * 6144) / (2048 * (24 * 5120**2 + 4 * 2048 * 5120))
    assert costs.forward_ms == pytest.approx(4.393 * flops)


def test_replica_pairs_on_one_node_make_bitpipes_replica_sync_cheaper_across_nodes(paper):
    model, cluster = paper
    spread = cost_model.predict(model, cluster, Layout("bitpipe", 8, 1, 4), 32)
    paired = cost_model.predict(model, cluster, Layout("bitpipe", 8, 1, 4, pipeline_rank_order="replica-pairs"), 32)
    assert paired.sync_ms * 4 < spread.sync_ms and paired.step_ms < spread.step_ms
    one_node = cost_model.predict(model, replace(cluster, gpus_per_node=64), Layout("bitpipe", 8, 1, 4), 32)
    assert one_node.sync_ms == pytest.approx(paired.sync_ms)


def test_the_cost_model_charges_the_iw_split_at_the_clusters_ratios(paper):
    model, cluster = paper
    one_f_one_b = cost_model.predict(model, cluster, Layout("1f1b", 8, 1, 4), 32)
    zero_bubble = cost_model.predict(model, cluster, Layout("zb-h1", 8, 1, 4), 32)
    costly_split = cost_model.predict(  # what torch.distributed.pipelining's split cost on an H200
        model, replace(cluster, input_grad_ratio=1.06, weight_grad_ratio=1.19), Layout("zb-h1", 8, 1, 4), 32
    )
    free_split = cost_model.predict(model, replace(cluster, input_grad_ratio=0.5, weight_grad_ratio=0.5),
                                    Layout("zb-h1", 8, 1, 4), 32)
    assert free_split.step_ms < zero_bubble.step_ms < one_f_one_b.step_ms < costly_split.step_ms


def test_bitpipe_holds_both_replicas_about_twice_the_parameters_of_1f1b(paper):
    model, cluster = paper
    one_f_one_b = cost_model.predict(model, cluster, Layout("1f1b", 8, 1, 4), 32)
    bitpipe = cost_model.predict(model, cluster, Layout("bitpipe", 8, 1, 4), 32)
    assert 1.85 < bitpipe.state_bytes / one_f_one_b.state_bytes <= 2.0  # one embedding, two replicas of layers


def test_fixed_costs_per_action_and_per_layer_are_charged_to_every_action(paper):
    model, cluster = paper
    plain = cost_model.predict(model, cluster, Layout("1f1b", 8, 1, 4), 32)
    slow = cost_model.predict(model, replace(cluster, action_overhead_ms=1.0, layer_overhead_ms=0.5),
                              Layout("1f1b", 8, 1, 4), 32)
    per_action = 1.0 + 12 * 0.5  # 96 layers over 8 stages
    assert slow.compute_ms - plain.compute_ms == pytest.approx(2 * 32 * per_action)  # 32 F, 32 B


def test_invalid_layouts_keep_the_registry_reason(paper):
    model, cluster = paper
    assert "bitpipe" in (cost_model.predict(model, cluster, Layout("bitpipe", 3, 1, 1), 6).invalid or "")
    assert "has one pipeline" in cost_model.predict(
        model, cluster, Layout("1f1b", 4, 1, 1, pipeline_rank_order="replica-pairs"), 8).invalid
    assert "spans nodes" in cost_model.predict(model, cluster, Layout("1f1b", 2, 16, 1), 8).invalid


def test_sweep_expands_each_schedule_with_only_its_own_options(paper):
    plan = config.SweepConfig(*paper, schedules=("1f1b", "interleaved-1f1b", "bitpipe"),
                              pipeline_parallel=(4,), microbatches=(8,), virtual_stages=(2, 4),
                              max_inflight=(None, 2), pipeline_rank_orders=("consecutive", "replica-pairs"))
    labels = [point.label() for point in sweep.expand(plan)]
    assert labels == [
        "1f1b-pp4-n8", "interleaved-1f1b-pp4-vp2-n8", "interleaved-1f1b-pp4-vp4-n8",
        "bitpipe-pp4-n8", "bitpipe-pp4-pairs-n8", "bitpipe-pp4-inflight2-n8", "bitpipe-pp4-inflight2-pairs-n8",
    ]


def test_sweep_writes_results_plots_and_progress_and_drops_points_with_reasons(tmp_path, capsys):
    sweep_file = write(tmp_path, "s.yaml", f"model: {CONFIGS}/models/paper-gpt.yaml\n"
                       f"cluster: {CONFIGS}/clusters/h100-8gpu-nodes.yaml\n"
                       "schedules: [1f1b, bitpipe, interleaved-1f1b]\npipeline_parallel: [3, 8]\n"
                       "data_parallel: [1]\nmicrobatches: [16, 24]\n")
    out = tmp_path / "results"
    assert cli.main(["sweep", str(sweep_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/12] 1f1b-pp3-n16:" in printed and "[12/12]" in printed
    table = list(csv.DictReader((out / "results.csv").open()))
    assert len(table) == 12 and set(sweep.COLUMNS) == set(table[0])
    by_label = {(row["schedule"], row["pipeline_parallel"], row["microbatches"]): row for row in table}
    assert by_label[("bitpipe", "3", "16")]["status"] == "invalid"
    assert "bitpipe" in by_label[("bitpipe", "3", "16")]["reason"]
    assert all(row["reason"] for row in table if row["status"] != "ok")
    assert float(by_label[("1f1b", "8", "16")]["tokens_per_s"]) > 0
    pytest.importorskip("matplotlib")
    assert (out / "tokens_per_s.png").stat().st_size > 0 and (out / "memory.png").stat().st_size > 0


def test_sweep_submit_dry_run_prints_one_job_per_fitting_point(tmp_path, capsys):
    sweep_file = write(tmp_path, "s.yaml", f"model: {CONFIGS}/models/paper-gpt.yaml\n"
                       f"cluster: {CONFIGS}/clusters/h100-8gpu-nodes.yaml\nschedules: [1f1b, bitpipe]\n"
                       "pipeline_parallel: [8]\ndata_parallel: [2]\nmicrobatches: [16]\n"
                       "launch: {partition: gpu, time: '00:10:00'}\n")
    assert cli.main(["sweep", str(sweep_file), "--out", str(tmp_path / "o"), "--submit", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("#SBATCH --nodes=2") == 2 and printed.count("#SBATCH --partition=gpu") == 2
    assert "--pipeline-schedule bitpipe" in printed
    assert list((tmp_path / "o" / "jobs").glob("*.sbatch")) == []


def test_recommend_answers_for_the_paper_gpt_on_32_gpus(paper, capsys):
    assert cli.main(["recommend", "--model", str(CONFIGS / "models" / "paper-gpt.yaml"),
                     "--cluster", str(CONFIGS / "clusters" / "h100-8gpu-nodes.yaml"), "--gpus", "32"]) == 0
    printed = capsys.readouterr().out
    assert "fastest: " in printed and "why it lost" in printed and "torch.distributed.run --nnodes=4" in printed
    found = recommend.recommend(*paper, 32)
    winner = found.winner
    assert winner is not None and winner.fits and winner.layout.world_size == 32
    assert all(p.tokens_per_s <= winner.tokens_per_s for p in found.ranked)
    for runner_up in found.ranked[1:6]:
        reason = recommend.why_slower(runner_up, winner)
        assert reason.startswith(("more bubble", "more communication", "more compute", "slower optimizer", "about as fast"))
    assert any(recommend.why_slower(p, winner).startswith("does not fit") for p in found.left_out if p.invalid is None)


def test_breakdown_parts_add_up_to_the_predicted_step(paper):
    for schedule, vp in (("bitpipe", None), ("interleaved-1f1b", 2), ("1f1b", None)):
        prediction = cost_model.predict(*paper, config.Layout(schedule, 8, 1, 4, vp), 16)
        parts = recommend.breakdown(prediction)
        assert parts["compute"] + parts["pipeline idle"] == pytest.approx(prediction.pipeline_ms)
        added = sum(parts[part] for part in recommend.BREAKDOWN_PARTS if part != "replica sync")
        assert added == pytest.approx(prediction.step_ms)
        assert (parts["replica sync"] > 0) == (schedule == "bitpipe")


def test_recommends_winner_written_as_a_launch_config_becomes_a_slurm_job(tmp_path, capsys):
    models, clusters = CONFIGS / "models", CONFIGS / "clusters"
    winner = tmp_path / "winner.yaml"
    assert cli.main(["recommend", "--model", str(models / "gpt3-1.3b.yaml"), "--cluster",
                     str(clusters / "h100-8gpu-nodes.yaml"), "--gpus", "4", "--write-launch", str(winner)]) == 0
    best = recommend.recommend(config.load_model(models / "gpt3-1.3b.yaml"),
                               config.load_cluster(clusters / "h100-8gpu-nodes.yaml"), 4).winner
    launch = config.load_launch(winner)
    assert launch.layout() == best.layout and launch.node_gpus == 4 and launch.nodes == 1
    capsys.readouterr()
    assert cli.main(["launch", str(winner), "--print"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=4" in script and f"--pipeline-schedule {best.layout.schedule}" in script


def test_recommend_picks_replica_pairs_for_bitpipe_across_nodes(paper):
    found = recommend.recommend(*paper, 32)
    best_bitpipe = next(p for p in found.ranked if p.layout.schedule == "bitpipe")
    assert best_bitpipe.layout.pipeline_rank_order == "replica-pairs"


def launch_file(tmp_path: Path, **overrides: object) -> Path:
    settings = {"model": f"{CONFIGS}/models/paper-gpt.yaml", "cluster": f"{CONFIGS}/clusters/h100-8gpu-nodes.yaml",
                "schedule": "bitpipe", "pipeline_parallel": 8, "nodes": 4, "pipeline_rank_order": "replica-pairs",
                "launcher": "megatron-lm", "save": "/ckpt/run 1", "save_interval": 100, "partition": "gpu",
                **overrides}
    return write(tmp_path, "launch.yaml", "".join(f"{key}: {value!r}\n" if isinstance(value, str) and " " in value
                                                  else f"{key}: {value}\n" for key, value in settings.items()))


def test_sbatch_script_passes_bash_n_and_carries_the_configs_arguments(tmp_path):
    launch = config.load_launch(launch_file(tmp_path))
    script = slurm.sbatch_script(launch)
    path = write(tmp_path, "job.sbatch", script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", "-S", "warning", str(path)]).returncode == 0
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --output=logs/%x-%j.out" in script and "#SBATCH --partition=gpu" in script
    command = script[script.index("srun "):].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[words.index("--nproc-per-node=8") - 1] == '--nnodes=$SLURM_NNODES'
    values = {flag: words[words.index(flag) + 1] for flag in (
        "--pipeline-model-parallel-size", "--pipeline-schedule", "--pipeline-rank-order", "--num-layers",
        "--hidden-size", "--num-attention-heads", "--seq-length", "--global-batch-size", "--save", "--save-interval")}
    assert values == {
        "--pipeline-model-parallel-size": "8", "--pipeline-schedule": "bitpipe", "--pipeline-rank-order": "replica-pairs",
        "--num-layers": "96", "--hidden-size": "3072", "--num-attention-heads": "32", "--seq-length": "1024",
        "--global-batch-size": "128", "--save": "/ckpt/run 1", "--save-interval": "100"}
    assert "$MEGATRON_LM_PATH/pretrain_gpt.py" in words and "--bf16" in words


@pytest.mark.parametrize(
    ("tensor_parallel", "extra_args", "needed"),
    [
        (1, (), None),
        (2, (), "tensor parallel 2"),
        (1, ("--context-parallel-size", "2"), "context parallel 2"),
        (2, ("--context-parallel-size=4",), "tensor parallel 2 and context parallel 4"),
        (2, ("--tensor-model-parallel-size", "1"), None),
    ],
)
def test_one_cuda_connection_only_with_tensor_or_context_parallelism(tmp_path, tensor_parallel, extra_args, needed):
    """CUDA_DEVICE_MAX_CONNECTIONS=1 is exported, with Megatron-LM's reason, exactly when the
    trainer's last tensor/context-parallel flag is above 1; otherwise the script says why not."""
    launch = replace(config.load_launch(launch_file(tmp_path, tensor_parallel=tensor_parallel)),
                     extra_args=extra_args)
    script = slurm.sbatch_script(launch)
    path = write(tmp_path, "job.sbatch", script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", "-S", "style", str(path)]).returncode == 0
    comments = " ".join(line[2:] for line in script.splitlines() if line.startswith("# "))
    exports = [line for line in script.splitlines() if line.startswith("export CUDA_DEVICE_MAX_CONNECTIONS")]
    if needed is None:
        assert exports == [] and slurm.connection_setting(launch) is None
        assert "CUDA_DEVICE_MAX_CONNECTIONS is left alone" in comments
        assert "where a pipeline send waiting for its receive blocks all later work" in comments
    else:
        assert exports == ["export CUDA_DEVICE_MAX_CONNECTIONS=1"]
        assert "Megatron-LM asserts 1 with tensor or context parallelism on Hopper" in comments
        assert f"this job has {needed}" in comments
        assert script.index(exports[0]) < script.index("srun ")
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in script
    assert all(len(line) <= 96 for line in script.splitlines() if line.startswith("#") and "SBATCH" not in line)


def test_launch_print_writes_nothing_and_slurm_writes_the_script(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = launch_file(tmp_path, launcher="trainer")
    assert cli.main(["launch", str(path), "--print"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("#!/bin/bash") and not (tmp_path / "jobs").exists()
    assert "-m megatron_bitpipe.train" in printed
    assert cli.main(["launch", str(path), "--slurm", "--out", "job.sbatch"]) == 0
    assert (tmp_path / "job.sbatch").read_text() == printed


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An ``sbatch`` on PATH that records the scripts it is given."""
    folder = tmp_path / "bin"
    record = tmp_path / "submitted.txt"
    write(folder, "sbatch", f"#!/bin/sh\necho \"$1\" >> {record}\necho Submitted batch job 42\n").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return record


@pytest.mark.multiprocess  # the package starts sbatch (tests/tiers.py reads only tests/)
def test_launch_and_sweep_submit_hand_each_script_to_sbatch(tmp_path, fake_sbatch, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["launch", str(launch_file(tmp_path)), "--slurm", "--submit"]) == 0
    sweep_file = write(tmp_path, "s.yaml", f"model: {CONFIGS}/models/paper-gpt.yaml\n"
                       f"cluster: {CONFIGS}/clusters/h100-8gpu-nodes.yaml\nschedules: [1f1b, bitpipe]\n"
                       "pipeline_parallel: [8]\ndata_parallel: [4]\nmicrobatches: [16]\n")
    assert cli.main(["sweep", str(sweep_file), "--out", "o", "--submit"]) == 0
    submitted = fake_sbatch.read_text().split()
    jobs = sorted(str(path.relative_to(tmp_path)) for path in (tmp_path / "o" / "jobs").glob("*.sbatch"))
    assert submitted[0].startswith("jobs/megatron-bitpipe-paper-gpt-bitpipe") and sorted(submitted[1:]) == jobs
    assert len(jobs) == 2


def test_submit_without_sbatch_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["launch", str(launch_file(tmp_path)), "--slurm", "--submit"]) == 2
    assert "--submit needs Slurm's sbatch on PATH" in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()


def test_a_launch_whose_gpus_do_not_fill_the_pipeline_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="pipeline_parallel: 1 nodes x 8 GPUs = 8 must be a multiple"):
        config.load_launch(launch_file(tmp_path, nodes=1, pipeline_parallel=3))


def cpu_run(*arguments: str, timeout: int = 600) -> str:
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "megatron_bitpipe", *arguments], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout, env=environment)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


needs_megatron = pytest.mark.skipif(
    importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None,
    reason="megatron-core is not installed")


@needs_megatron
def test_launch_local_runs_the_configs_command_here(tmp_path):
    path = write(tmp_path, "launch.yaml", f"model: {CONFIGS}/models/tiny-demo.yaml\n"
                 f"cluster: {CONFIGS}/clusters/local-cpu.yaml\n"
                 "schedule: bitpipe\npipeline_parallel: 2\nnodes: 1\ntrain_iters: 2\nlr: 0.003\n")
    printed = cpu_run("launch", str(path), "--local")
    command = shlex.split(printed.splitlines()[0].removeprefix("$ "))
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert printed.count("lm loss:") == 2 and "global batch size:    32" in printed
    assert "the replicas of every stage are bitwise identical" in printed


@needs_megatron
def test_bench_and_sweep_run_local_measure_real_runs(tmp_path):
    tiny = ("--num-layers 8 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
            "--micro-batch-size 2 --global-batch-size 8 --train-iters 3 --pipeline-model-parallel-size 2").split()
    out = tmp_path / "bench"
    printed = cpu_run("bench", "--nproc-per-node", "2", "--pipeline-schedule", "1f1b,bitpipe,megatron-1f1b",
                      "--out", str(out), "--cluster", str(CONFIGS / "clusters" / "local-cpu.yaml"), *tiny)
    table = list(csv.DictReader((out / "bench.csv").open()))
    assert [row["schedule"] for row in table] == ["1f1b", "bitpipe", "megatron-1f1b"]
    for column in ("step_ms_median", "step_ms_min", "step_ms_max", "tokens_per_s", "peak_activation_bytes"):
        assert all(float(row[column]) > 0 for row in table), column
    assert table[0]["simulated_ms"] and table[0]["error_pct"] and float(table[2]["vs_megatron-1f1b"]) == 1.0
    assert "bench: wrote" in printed
    sweep_file = write(tmp_path, "s.yaml", f"model: {CONFIGS}/models/tiny-demo.yaml\n"
                       f"cluster: {CONFIGS}/clusters/local-cpu.yaml\nschedules: [1f1b, chimera]\n"
                       "pipeline_parallel: [2]\nmicrobatches: [4]\nlaunch: {train_iters: 3}\n")
    printed = cpu_run("sweep", str(sweep_file), "--out", str(tmp_path / "sweep"), "--run-local", "--max-processes", "2")
    assert "run-local [1/1] 1f1b,chimera-pp2-n4: 2 processes" in printed
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert all(float(row["measured_step_ms"]) > 0 and float(row["step_ms"]) > 0 for row in rows)


def test_output_cut_short_by_the_reader_ends_quietly():
    command = (f"{shlex.quote(sys.executable)} -m megatron_bitpipe recommend --model {CONFIGS}/models/paper-gpt.yaml "
               f"--cluster {CONFIGS}/clusters/h100-8gpu-nodes.yaml --gpus 32 | head -1")
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("recommend: paper-gpt on 32 GPUs") and result.stderr == ""
