"""A launch config as a command line and as a Slurm batch script.

``training_command(launch)`` is the per-process command (our trainer, or Megatron-LM's
``pretrain_gpt.py`` through ``megatron_bitpipe.megatron_lm``) with the config's arguments.
``sbatch_script(launch)`` wraps it: one ``srun`` task per node starts ``torchrun``, which starts
one process per GPU and meets the other nodes at a c10d rendezvous on the job's first node.
``local_command(launch)`` is the same command under ``torchrun --standalone`` on this machine.
"""

from __future__ import annotations

import os
import shlex
import sys
import textwrap
from typing import Sequence

from megatron_bitpipe.scale.config import LaunchConfig

MASTER_PORT = 29500
NCCL_SETTINGS = (
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3",
     "a failed or timed-out collective tears the process down instead of hanging the job"),
    ("NCCL_DEBUG", "${NCCL_DEBUG:-WARN}", "INFO prints the topology NCCL found (rings, NVLink, IB)"),
    ("NCCL_IB_TIMEOUT", "${NCCL_IB_TIMEOUT:-22}", "InfiniBand retry timeout (4.096 us x 2^22): rides out link flaps"),
)
"""Environment of every job: (name, value, why)."""

ONE_CONNECTION_WHY = (
    "Megatron-LM asserts 1 with tensor or context parallelism on Hopper and earlier GPUs "
    "(megatron/training/arguments.py), so their communication kernels queue before the compute "
    "they overlap; this job has {parallel}"
)
DEFAULT_CONNECTIONS_WHY = (
    "CUDA_DEVICE_MAX_CONNECTIONS is left alone (CUDA's default is 8 hardware queues): no tensor "
    "or context parallelism here, and with 1 every stream of a GPU shares one hardware queue, "
    "where a pipeline send waiting for its receive blocks all later work"
)


def connection_setting(launch: LaunchConfig) -> tuple[str, str, str] | None:
    """``("CUDA_DEVICE_MAX_CONNECTIONS", "1", why)`` when ``launch`` needs one connection, else None.

    Needed when the tensor- or context-parallel size the trainer reads is above 1: the last
    ``--tensor-model-parallel-size`` / ``--context-parallel-size`` of its arguments, as argparse
    reads them (the layout's ``tensor_parallel``, then ``extra_args``).
    """
    arguments = training_arguments(launch)
    sizes = {
        "tensor": _last_int(arguments, "--tensor-model-parallel-size"),
        "context": _last_int(arguments, "--context-parallel-size"),
    }
    parallel = [f"{kind} parallel {size}" for kind, size in sizes.items() if size > 1]
    if not parallel:
        return None
    return ("CUDA_DEVICE_MAX_CONNECTIONS", "1", ONE_CONNECTION_WHY.format(parallel=" and ".join(parallel)))


def _last_int(arguments: Sequence[str], flag: str) -> int:
    """The value of ``flag`` (``FLAG N`` or ``FLAG=N``) last given in ``arguments``; 1 when absent."""
    value = "1"
    for index, word in enumerate(arguments):
        if word == flag and index + 1 < len(arguments):
            value = arguments[index + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return int(value) if value.isdigit() else 1


def training_command(launch: LaunchConfig) -> list[str]:
    """The per-process command of ``launch`` (what torchrun starts on every GPU)."""
    if launch.launcher == "megatron-lm":
        entry = [launch.python, "-m", "megatron_bitpipe.megatron_lm", f"{launch.megatron_lm_path}/pretrain_gpt.py"]
    else:
        entry = [launch.python, "-m", "megatron_bitpipe.train"]
    return [*entry, *training_arguments(launch)]


def training_arguments(launch: LaunchConfig) -> list[str]:
    """The arguments of ``launch``'s trainer or ``pretrain_gpt.py``, without the program."""
    model, layout = launch.model, launch.layout()
    schedule = [
        "--pipeline-model-parallel-size", str(layout.pipeline_parallel),
        "--tensor-model-parallel-size", str(layout.tensor_parallel),
        "--pipeline-schedule", layout.schedule,
    ]
    if layout.virtual_stages is not None:
        flag = ("--num-virtual-stages-per-pipeline-rank" if launch.launcher == "megatron-lm"
                else "--virtual-pipeline-model-parallel-size")
        schedule += [flag, str(layout.virtual_stages)]
    if layout.max_inflight is not None:
        schedule += ["--max-inflight", str(layout.max_inflight)]
    if layout.pipeline_rank_order != "consecutive":
        schedule += ["--pipeline-rank-order", layout.pipeline_rank_order]
    sizes = [
        "--num-layers", str(model.num_layers),
        "--hidden-size", str(model.hidden_size),
        "--num-attention-heads", str(model.num_attention_heads),
        "--seq-length", str(model.seq_length),
        "--max-position-embeddings", str(model.seq_length),
        "--micro-batch-size", str(model.micro_batch_size),
        "--global-batch-size", str(model.global_batch_size),
        "--train-iters", str(launch.train_iters),
        "--lr", repr(launch.lr),
    ]
    if model.ffn_hidden_size is not None:
        sizes += ["--ffn-hidden-size", str(model.ffn_hidden_size)]
    if model.precision != "fp32":
        sizes += [f"--{model.precision}"]
    if model.untie_embeddings:
        sizes += ["--untie-embeddings-and-output-weights"]
    if model.distributed_optimizer:
        sizes += ["--use-distributed-optimizer"]
    if launch.save is not None:
        sizes += ["--save", launch.save, "--load", launch.save]
        if launch.save_interval is not None:
            sizes += ["--save-interval", str(launch.save_interval)]
    if launch.launcher == "megatron-lm":
        data = (["--data-path", launch.data_path] if launch.data_path is not None
                else ["--mock-data", "--tokenizer-type", "NullTokenizer"])
        data += ["--vocab-size", str(model.vocab_size), "--log-interval", "1"]
    else:
        data = ["--vocab-size", str(model.vocab_size)]
    return [*schedule, *sizes, *data, *launch.extra_args]


def nproc_per_node(launch: LaunchConfig) -> int:
    return launch.node_gpus


def local_command(launch: LaunchConfig) -> list[str]:
    """``torchrun --standalone`` on this machine (this Python) with the job's processes and arguments."""
    processes = launch.nodes * nproc_per_node(launch)
    _, *rest = training_command(launch)
    rest = [os.path.expandvars(word) for word in rest]  # $MEGATRON_LM_PATH, as the job's shell would
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *rest]


def job_name(launch: LaunchConfig) -> str:
    return launch.job_name or f"megatron-bitpipe-{launch.model.name}-{launch.layout().label()}"


def sbatch_script(launch: LaunchConfig, source: str = "") -> str:
    """The Slurm batch script of ``launch``; ``source`` names the config it came from."""
    name = job_name(launch)
    directives = [
        f"--job-name={name}",
        f"--nodes={launch.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={nproc_per_node(launch)}",
        f"--time={launch.time}",
        f"--output={launch.log_dir}/%x-%j.out",
    ]
    if launch.partition:
        directives.append(f"--partition={launch.partition}")
    if launch.account:
        directives.append(f"--account={launch.account}")
    layout = launch.layout()
    lines = ["#!/bin/bash", *(f"#SBATCH {directive}" for directive in directives)]
    lines += [
        f"# Written by megatron-bitpipe launch{' ' + source if source else ''}.",
        f"# Model {launch.model.name} on {launch.nodes} x {launch.node_gpus} GPUs "
        f"({launch.cluster.name}): {layout.label()}, world size {layout.world_size}.",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(launch.log_dir)}",
        "",
    ]
    connections = connection_setting(launch)
    settings = NCCL_SETTINGS if connections is None else (connections, *NCCL_SETTINGS)
    if connections is None:
        lines += [*_comment(DEFAULT_CONNECTIONS_WHY), ""]
    for variable, value, why in settings:
        lines += [*_comment(why), f"export {variable}={_shell_word(value)}"]
    lines += [
        "",
        "# Rendezvous on the job's first node; torchrun starts one process per GPU on every node.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT=${{MASTER_PORT:-{MASTER_PORT}}}",
        "export MASTER_ADDR MASTER_PORT",
        "",
        "srun --kill-on-bad-exit=1 \\",
    ]
    command = training_command(launch)
    torchrun = [
        command[0], "-m", "torch.distributed.run",
        '--nnodes="$SLURM_NNODES"', f"--nproc-per-node={nproc_per_node(launch)}",
        "--rdzv-backend=c10d", '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', '--rdzv-id="$SLURM_JOB_ID"',
    ]
    lines.append(_continued([*map(_shell_word, torchrun[:3]), *torchrun[3:], *map(_shell_word, command[1:])]))
    return "\n".join(lines) + "\n"


def _comment(text: str, width: int = 96) -> list[str]:
    """``text`` as shell comment lines of at most ``width`` characters."""
    return [f"# {line}" for line in textwrap.wrap(text, width - 2)]


def _continued(words: Sequence[str], width: int = 96) -> str:
    """Shell words in lines of at most ``width`` characters, joined by backslash-newlines."""
    lines, current = [], "  "
    for word in words:
        if len(current) + len(word) + 1 > width and current.strip():
            lines.append(current.rstrip() + " \\")
            current = "    "
        current += word + " "
    lines.append(current.rstrip())
    return "\n".join(lines)


def _shell_word(word: str) -> str:
    """One shell word; ``$VARIABLE`` and ``${...}`` stay expandable (inside double quotes)."""
    if "$" in word:
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'
    return shlex.quote(word)
