"""A cluster config's ``measured_costs`` (a bench's costs.json) in the cost model, and scripts/bed.sh.

The costs.json here is written by each test (plausible round numbers, no measurement): what is
checked is that ``predict`` and the commands built on it (sweep, recommend, bench's simulated
column) take their costs from it, agree with ``measured_costs.predict_step_ms``, and refuse a
model the file was not measured on. No torch, nothing run but bash.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_bitpipe import cli
from megatron_bitpipe.scale import commands, config, cost_model, recommend, sweep
from megatron_bitpipe.scale import measured_costs as mc
from megatron_bitpipe.scale.config import ConfigError, Layout
from megatron_bitpipe.schedules import lower, registry
from megatron_bitpipe.schedules.simulate import simulate

REPO = Path(__file__).resolve().parent.parent
BED = REPO / "scripts" / "bed.sh"

SIZES = {"hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "micro_batch_size": 1}
COSTS = mc.MeasuredCosts(
    basis="wall",
    kinds={"F": mc.KindCost(2.0, 0.5, 3.0, 1.0), "B": mc.KindCost(4.0, 0.2, 6.0, 1.5),
           "I": mc.KindCost(2.5, 0.1, 5.0, 0.8), "W": mc.KindCost(1.5, 0.1, 0.0, 0.7)},
    action_overhead_ms=0.3, message_latency_ms=0.05, message_ms_per_mb=2.0,
    activation_bytes=32 * 64 * 4,  # seq x micro-batch x hidden, fp32
    sync_ms_per_mb=3.0, optimizer_ms_per_mparam=10.0, step_other_ms=1.5, finalize_ms=0.7,
    num_layers=8, parameters_per_layer=49984, sources=("1f1b",), **SIZES,
)
CLUSTER = ("name: {name}\ngpus_per_node: 8\ngpu_memory_gib: 16\nintra_node_gbps: 10\ninter_node_gbps: 1\n"
           "action_overhead_ms: 5\n")


def model_yaml(**overrides: object) -> str:
    fields = {"name": "m", "num_layers": 8, **SIZES, "global_batch_size": 8, "precision": "fp32", **overrides}
    return "".join(f"{key}: {value}\n" for key, value in fields.items())


@pytest.fixture
def files(tmp_path):
    """costs.json in a folder of its own, a cluster naming it (relative), the same cluster
    without it (FLOP costs), and a model of the measured shape."""
    (tmp_path / "measured").mkdir()
    mc.save(COSTS, tmp_path / "measured" / "costs.json")
    (tmp_path / "clusters").mkdir()
    measured = tmp_path / "clusters" / "measured.yaml"
    measured.write_text(CLUSTER.format(name="measured") + "measured_costs: ../measured/costs.json\n")
    plain = tmp_path / "clusters" / "plain.yaml"
    plain.write_text(CLUSTER.format(name="plain") + "achieved_tflops: 0.12\n")
    model = tmp_path / "model.yaml"
    model.write_text(model_yaml())
    return argparse.Namespace(root=tmp_path, measured=measured, plain=plain, model=model)


def load(files, **model_overrides):
    model = config.load_model(files.model)
    if model_overrides:
        path = files.root / "other-model.yaml"
        path.write_text(model_yaml(**model_overrides))
        model = config.load_model(path)
    return model, config.load_cluster(files.measured)


def layout_for(name: str, pp: int = 4, **kwargs) -> Layout:
    vp = 2 if "vp" in registry.get(name).options else None
    return Layout(name, pp, virtual_stages=vp, **kwargs)


def test_the_path_resolves_against_the_cluster_file_and_a_bad_one_is_one_line(files):
    cluster = config.load_cluster(files.measured)
    assert cluster.measured_costs == str((files.root / "measured" / "costs.json").resolve())
    assert config.FIELD_DOCS[config.ClusterConfig]["measured_costs"].startswith("Costs fitted to a real run")
    for text, expected in (("measured_costs: nowhere.json\n", "measured_costs: "),
                           ("measured_costs: ../model.yaml\n", "is not a costs.json")):
        bad = files.root / "clusters" / "bad.yaml"
        bad.write_text(CLUSTER.format(name="bad") + text)
        with pytest.raises(ConfigError) as error:
            config.load_cluster(bad)
        assert str(error.value).startswith(f"{bad}: measured_costs: ") and expected in str(error.value)
        assert "\n" not in str(error.value)


def test_measured_costs_change_the_step_and_scale_with_layers_per_stage(files):
    model, cluster = load(files)
    plain = config.load_cluster(files.plain)
    layout = layout_for("1f1b")
    with_costs, without = cost_model.predict(model, cluster, layout, 8), cost_model.predict(model, plain, layout, 8)
    assert with_costs.invalid is None and without.invalid is None
    assert with_costs.step_ms != pytest.approx(without.step_ms, rel=0.05)
    assert cost_model.layer_costs(model, cluster).source.startswith("measured_costs ")
    # the costs are per layer: a model of twice the measured layers is predicted, each stage
    # charged KindCost.chunk_ms at its own layer count (4 layers per stage at PP=4)
    deeper, _ = load(files, num_layers=16)
    schedule = lower(registry.build("1f1b", 4, 8))
    stage = cost_model.stage_costs(deeper, cluster, layout, schedule, cost_model.layer_costs(deeper, cluster))
    assert stage.forward == pytest.approx(COSTS.kind("F").chunk_ms(4, False, False) + COSTS.action_overhead_ms)
    assert stage.weight_grad == pytest.approx(COSTS.kind("W").chunk_ms(4, False, False) + COSTS.action_overhead_ms)
    assert stage.stage_extra == {0: (0.5, 0.2), -1: (3.0, 6.0)}
    assert stage.latency == COSTS.message_latency_ms and stage.message_bytes == COSTS.activation_bytes
    assert stage.sync_time(0, 1) == pytest.approx(4 * COSTS.parameters_per_layer * 4 / 2**20 * COSTS.sync_ms_per_mb)
    deeper_step = cost_model.predict(deeper, cluster, layout, 8)
    assert deeper_step.compute_ms > with_costs.compute_ms
    assert deeper_step.optimizer_ms == pytest.approx(
        COSTS.optimizer_ms_per_mparam * cost_model._parameters_per_rank(deeper, layout, schedule, 4) / 1e6)


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "interleaved-1f1b", "v-half", "v-zb"])
def test_one_pipeline_prediction_equals_predict_step_ms(files, name):
    model, cluster = load(files)
    layout = layout_for(name)
    prediction = cost_model.predict(model, cluster, layout, 8)
    schedule = lower(registry.build(name, 4, 8, **layout.options()))
    parameters = cost_model._parameters_per_rank(model, layout, schedule, 8 // schedule.placement.stages_per_pipeline)
    expected = mc.predict_step_ms(COSTS, name, 4, 8, parameters, layout.options())
    assert prediction.step_ms == pytest.approx(expected, rel=1e-12)
    assert prediction.other_ms == pytest.approx(COSTS.finalize_ms + COSTS.step_other_ms)


@pytest.mark.parametrize("name", ["bitpipe", "bitpipe-zb"])
def test_two_pipeline_prediction_includes_the_replica_syncs_as_predict_step_ms_does(files, name):
    """Both simulate the lowered schedule, so the replica syncs that run past the last compute
    action count in both."""
    model, cluster = load(files)
    layout = layout_for(name)
    prediction = cost_model.predict(model, cluster, layout, 8)
    built = registry.build(name, 4, 8)
    parameters = cost_model._parameters_per_rank(model, layout, built, 8 // built.placement.stages_per_pipeline)
    costs = mc.simulator_costs(COSTS, built)
    syncs_past_compute = simulate(lower(built), costs).makespan - simulate(built, costs).makespan
    assert syncs_past_compute > 0 and prediction.sync_ms > 0
    assert prediction.step_ms == pytest.approx(mc.predict_step_ms(COSTS, name, 4, 8, parameters))


@pytest.mark.parametrize("overrides, named", [
    ({"hidden_size": 128}, "hidden_size 64; model m has hidden_size 128"),
    ({"seq_length": 64, "micro_batch_size": 2, "global_batch_size": 16},
     "seq_length 32, micro_batch_size 1; model m has seq_length 64, micro_batch_size 2"),
    ({"num_attention_heads": 8}, "num_attention_heads 4; model m has num_attention_heads 8"),
    ({"precision": "bf16"}, "4-byte activations; model m has precision bf16"),
    ({"ffn_hidden_size": 128}, "ffn_hidden_size 4 x hidden_size = 256; model m has ffn_hidden_size 128"),
])
def test_a_model_unlike_the_measured_one_is_refused_in_one_line(files, overrides, named):
    model, cluster = load(files, **overrides)
    with pytest.raises(ValueError) as error:
        cost_model.predict(model, cluster, layout_for("1f1b"), 8)
    message = str(error.value)
    assert message.startswith(f"measured_costs {cluster.measured_costs} ") and named in message
    assert "\n" not in message


def test_a_costs_file_without_the_model_sizes_is_refused_and_the_cli_says_so_in_one_line(files, capsys):
    unsized = {name: None for name in SIZES}
    mc.save(replace(COSTS, **unsized), files.root / "measured" / "costs.json")
    status = cli.main(["recommend", "--model", str(files.model), "--cluster", str(files.measured), "--gpus", "4"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1
    assert error.startswith("megatron-bitpipe: error: measured_costs ")
    assert "does not record the measured hidden_size, seq_length, micro_batch_size, num_attention_heads" in error


def test_tensor_parallel_is_refused_per_layout_and_data_parallel_uses_the_measured_all_reduce(files):
    model, cluster = load(files)
    refused = cost_model.predict(model, cluster, layout_for("1f1b", pp=2, tensor_parallel=2), 8)
    assert refused.invalid == (f"tensor_parallel 2: measured_costs {cluster.measured_costs} "
                               f"was measured at tensor_parallel 1")
    layout = layout_for("1f1b", pp=2, data_parallel=2)
    prediction = cost_model.predict(model, cluster, layout, 4)
    schedule = lower(registry.build("1f1b", 2, 4))
    parameters = cost_model._parameters_per_rank(model, layout, schedule, 4)
    # a two-rank ring moves the gradients once: the calibrated ms per MB, the last chunk's share
    assert prediction.data_parallel_ms == pytest.approx(parameters * 4 / 2**20 * COSTS.sync_ms_per_mb)


def test_sweep_takes_its_costs_from_the_file(files, monkeypatch, capsys):
    plan = files.root / "sweep.yaml"
    plan.write_text(f"model: {files.model}\ncluster: {files.measured}\nschedules: [1f1b, bitpipe, zb-h1]\n"
                    "pipeline_parallel: [2, 4]\nmicrobatches: [8]\n")

    def no_plots(*_args, **_kwargs):
        raise ImportError("matplotlib left out: the table is what is checked")

    monkeypatch.setattr(sweep, "plot", no_plots)
    assert cli.main(["sweep", str(plan), "--out", str(files.root / "out")]) == 0
    assert "(layer costs: measured_costs " in capsys.readouterr().out
    model, cluster = load(files)
    with (files.root / "out" / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6 and all(row["status"] == "ok" for row in table)
    for row in table:
        layout = Layout(row["schedule"], int(row["pipeline_parallel"]))
        assert row["step_ms"] == f"{cost_model.predict(model, cluster, layout, 8).step_ms:.3f}"


def test_recommend_takes_its_costs_from_the_file(files, capsys):
    model, cluster = load(files)
    winner = recommend.recommend(model, cluster, 4).winner
    assert winner.step_ms == cost_model.predict(model, cluster, winner.layout, winner.microbatches).step_ms
    plain_step = cost_model.predict(model, config.load_cluster(files.plain), winner.layout, winner.microbatches)
    assert plain_step.step_ms != pytest.approx(winner.step_ms, rel=0.05)
    status = cli.main(["recommend", "--model", str(files.model), "--cluster", str(files.measured), "--gpus", "4"])
    out = capsys.readouterr().out
    assert status == 0
    assert f"fastest: {winner.layout.label()} with {winner.microbatches} microbatches per step: " \
           f"{winner.step_ms:.0f} ms per step" in out
    assert "tensor_parallel 2: measured_costs" not in out  # left out, not ranked


def test_bench_simulated_column_takes_its_costs_from_the_file(files):
    from megatron_bitpipe.train_args import build_parser

    trainer = ("--pipeline-model-parallel-size 4 --num-layers 8 --hidden-size 64 --num-attention-heads 4 "
               "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 1 --global-batch-size 8 "
               "--virtual-pipeline-model-parallel-size 2").split()
    known, _ = build_parser().parse_known_args(trainer)
    schedules = ["1f1b", "interleaved-1f1b", "bitpipe", "megatron-1f1b"]
    found = commands._simulated(argparse.Namespace(cluster=str(files.measured), nproc_per_node=4), known, schedules)
    model = config.ModelConfig(name="bench", precision="fp32", vocab_size=known.vocab_size, global_batch_size=8,
                               num_layers=8, **SIZES)
    cluster = config.load_cluster(files.measured)
    assert sorted(found) == ["1f1b", "bitpipe", "interleaved-1f1b"]  # megatron-1f1b has no simulation
    for name, step in found.items():
        assert step == cost_model.predict(model, cluster, layout_for(name), 8).step_ms


def fake_bin(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)
    return path


def run_bed(tmp_path: Path, cores: int, *arguments: str) -> subprocess.CompletedProcess:
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir(exist_ok=True)
    fake_bin(bin_folder, "nproc", f"echo {cores}")
    environment = {**os.environ, "PATH": f"{bin_folder}:{os.environ['PATH']}"}
    environment["MEGATRON_BITPIPE"] = str(fake_bin(tmp_path, "fake-megatron-bitpipe", f"""
echo "$*" >> {tmp_path}/calls
previous=; for argument in "$@"; do [ "$previous" = --out ] && out=$argument; previous=$argument; done
mkdir -p "$out" && printf '| schedule | error_pct |\\n|---|---|\\n| 1f1b | +1.0 |\\n' > "$out/bench.md"
"""))
    return subprocess.run(["bash", str(BED), *arguments], capture_output=True, text=True, env=environment, timeout=30)


def test_bed_script_parses_and_refuses_a_small_machine_in_one_line(tmp_path):
    assert subprocess.run(["bash", "-n", str(BED)], capture_output=True).returncode == 0
    result = run_bed(tmp_path, 2, "--out", str(tmp_path / "bed"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "2 cores" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "calls").exists()


@pytest.mark.parametrize("cluster", [(), ("--cluster", "configs/clusters/local-cpu.yaml")])
def test_bed_script_runs_both_batches_with_force_and_prints_their_tables(tmp_path, cluster):
    result = run_bed(tmp_path, 2, "--force", "--out", str(tmp_path / "bed"), *cluster)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2
    for call, n in zip(calls, (16, 32)):
        assert call.startswith("bench --nproc-per-node 8 --pipeline-schedule megatron-1f1b,1f1b,interleaved-1f1b,"
                               "megatron-interleaved,zb-h1,v-half,v-zb,bitpipe,bitpipe-zb ")
        assert f"--out {tmp_path}/bed/n{n} --repeat 3 " in call
        assert re.search(rf"--global-batch-size {n} --train-iters 6$", call)
        assert "--pipeline-model-parallel-size 8 --virtual-pipeline-model-parallel-size 2 --num-layers 16" in call
        assert ("--cluster configs/clusters/local-cpu.yaml" in call) == bool(cluster)
    assert result.stdout.count("| 1f1b | +1.0 |") == 2 and f"== {tmp_path}/bed/n32/bench.md (N=32)" in result.stdout
