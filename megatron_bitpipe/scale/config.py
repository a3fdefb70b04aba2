"""Typed configs: YAML files loaded into frozen dataclasses, every error one line.

    model = load_model("configs/models/paper-gpt.yaml")
    sweep = load_sweep("configs/sweeps/paper-gpt-32.yaml")   # its model and cluster loaded too

A file is a mapping whose keys are a dataclass's fields. An unknown key, a missing required key,
a value of the wrong type or an impossible value raises ``ConfigError``, whose message names the
file, the key and the rule (``megatron-bitpipe`` prints it as one line and exits 2). A sweep or
launch config names its model and cluster by path (relative to its own folder) or by bare name
(``paper-gpt`` is ``<configs>/models/paper-gpt.yaml``, ``<configs>`` being the folder above).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from megatron_bitpipe.schedules.choice import ScheduleChoice

PRECISIONS = ("bf16", "fp16", "fp32")
LAUNCHERS = ("megatron-lm", "trainer")
RANK_ORDERS = ("consecutive", "replica-pairs")
CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"
"""The repository's configs folder (measured cost files of the GPU kinds)."""


GPU_KINDS = {"h100": ("h100_layer_costs.json", None), "h200": ("h200_layer_costs.json", None),
             "a100": (None, 110.0), "cpu": (None, 0.12)}
"""GPU kind: (measured layer file in configs/, or a sustained TFLOP/s)."""


class ConfigError(ValueError):
    """A config that cannot be used: ``<file>: <key>: <rule>``."""


@dataclass(frozen=True)
class ModelConfig:
    """A transformer to train: sizes, batch and precision."""

    name: str
    """Label used in tables and job names."""
    num_layers: int
    """Transformer layers (Megatron's --num-layers)."""
    hidden_size: int
    """Hidden size h (--hidden-size)."""
    num_attention_heads: int
    """Attention heads; must divide hidden_size (--num-attention-heads)."""
    seq_length: int
    """Tokens per sequence (--seq-length)."""
    global_batch_size: int
    """Sequences per optimizer step (--global-batch-size); recommend keeps it fixed."""
    micro_batch_size: int = 1
    """Sequences per microbatch (--micro-batch-size)."""
    vocab_size: int = 50304
    """Vocabulary size (padded), for the embedding and output layer."""
    ffn_hidden_size: int | None = None
    """MLP hidden size; 4 x hidden_size when left out (--ffn-hidden-size)."""
    precision: str = "bf16"
    """bf16, fp16 or fp32 (--bf16 / --fp16)."""
    untie_embeddings: bool = False
    """Separate input embedding and output layer (--untie-embeddings-and-output-weights)."""
    distributed_optimizer: bool = False
    """Shard the optimizer state over data parallel (--use-distributed-optimizer): 6 + 12/DP
    bytes per parameter instead of 18 (bf16/fp16)."""

    def rules(self) -> list[tuple[str, str]]:
        broken = _positive(self, "num_layers", "hidden_size", "num_attention_heads", "seq_length",
                           "global_batch_size", "micro_batch_size", "vocab_size")
        if self.hidden_size > 0 and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
            broken.append(("hidden_size", f"{self.hidden_size} must be divisible by "
                                          f"num_attention_heads {self.num_attention_heads}"))
        if self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size:
            broken.append(("global_batch_size", f"{self.global_batch_size} must be a multiple of "
                                                f"micro_batch_size {self.micro_batch_size}"))
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            broken.append(("ffn_hidden_size", f"{self.ffn_hidden_size} must be positive"))
        if self.precision not in PRECISIONS:
            broken.append(("precision", f"{self.precision!r} must be one of {', '.join(PRECISIONS)}"))
        return broken

    @property
    def bytes_per_value(self) -> int:
        return 4 if self.precision == "fp32" else 2

    def with_microbatches(self, microbatches: int, data_parallel: int) -> ModelConfig:
        """This model with the global batch of ``microbatches`` per data-parallel rank."""
        return replace(self, global_batch_size=microbatches * self.micro_batch_size * data_parallel)


@dataclass(frozen=True)
class ClusterConfig:
    """Where a model runs: node shape, GPU memory, compute costs and links."""

    name: str
    """Label used in tables."""
    gpus_per_node: int
    """GPUs in one node (torchrun --nproc-per-node)."""
    gpu_memory_gib: float
    """Memory of one GPU, GiB; a layout fits when its peak estimate stays below it."""
    intra_node_gbps: float
    """Bandwidth between two GPUs of a node (NVLink), GB/s."""
    inter_node_gbps: float
    """Bandwidth between GPUs of two nodes (InfiniBand or RoCE, per GPU), GB/s."""
    intra_node_latency_us: float = 5.0
    """Latency of one message inside a node, microseconds."""
    inter_node_latency_us: float = 15.0
    """Latency of one message across nodes, microseconds."""
    layer_costs: str | None = None
    """Measured per-layer costs (JSON like configs/h100_layer_costs.json), relative to this file."""
    achieved_tflops: float | None = None
    """Sustained dense TFLOP/s of one GPU, for models with no measured row (FLOP-count costs)."""
    gpu: str | None = None
    """A GPU kind (h100, h200, a100, cpu) whose costs apply when layer_costs and achieved_tflops
    are both left out: the measured file of h100 and h200, a sustained rate for the others."""
    measured_costs: str | None = None
    """Costs fitted to a real run (the costs.json ``megatron-bitpipe bench`` writes), relative to
    this file. When set, they replace the FLOP/layer_costs model and the overheads: compute per
    layer and per action with the embedding and head extras, action overhead, message latency
    and bandwidth, replica and data-parallel sync per MB, optimizer step per parameter and the
    step's other work. Only for a model of the measured hidden_size, num_attention_heads,
    seq_length, micro_batch_size, precision and default ffn_hidden_size (num_layers may differ),
    at tensor_parallel 1; other models are refused. Cross-node links stay the ones above."""
    action_overhead_ms: float = 0.0
    """Host time added to every F, B, I and W action (framework, p2p bookkeeping): negligible for
    large layers, most of the step for tiny CPU models."""
    layer_overhead_ms: float = 0.0
    """Host time added per layer to every action (per-module framework cost), likewise."""
    memory_headroom: float = 0.9
    """Share of gpu_memory_gib a layout may use (the rest: allocator, workspace, NCCL)."""
    input_grad_ratio: float = 0.63
    """Cost of a split-off input gradient (I) over a whole backward: 0.63, the median of
    ``scripts/bench_split.py`` over its shapes on one CPU core (the weight-gradient store; no GPU
    has measured it: the split this replaced cost 1.06 on an H200)."""
    weight_grad_ratio: float = 0.43
    """Cost of a split-off weight gradient (W) over a whole backward: 0.43 measured likewise
    (the replaced split: 1.19 on an H200)."""

    def rules(self) -> list[tuple[str, str]]:
        broken = _positive(self, "gpus_per_node", "gpu_memory_gib", "intra_node_gbps", "inter_node_gbps")
        broken += _non_negative(self, "intra_node_latency_us", "inter_node_latency_us")
        sources = (self.layer_costs, self.achieved_tflops, self.gpu, self.measured_costs)
        if all(source is None for source in sources):
            broken.append(("layer_costs", "give layer_costs (a measured file), achieved_tflops, gpu or measured_costs"))
        if self.gpu is not None and self.gpu not in GPU_KINDS:
            broken.append(("gpu", f"{self.gpu!r} must be one of {', '.join(GPU_KINDS)}"))
        broken += _non_negative(self, "action_overhead_ms", "layer_overhead_ms")
        if self.achieved_tflops is not None and not (0 < self.achieved_tflops < math.inf):
            broken.append(("achieved_tflops", f"{self.achieved_tflops} must be positive and finite"))
        broken += _positive(self, "input_grad_ratio", "weight_grad_ratio")
        if not 0 < self.memory_headroom <= 1:
            broken.append(("memory_headroom", f"{self.memory_headroom} must be in (0, 1]"))
        return broken


@dataclass(frozen=True)
class Layout:
    """One parallel layout of a model: what a launch or a sweep point runs."""

    schedule: str
    """A registry schedule (megatron-bitpipe simulate --help lists them) or one of megatron-core's own
    (``schedules.choice.MEGATRON_FUNCTIONS``); ``choice`` is the parsed value."""
    pipeline_parallel: int
    """Pipeline ranks D (--pipeline-model-parallel-size)."""
    tensor_parallel: int = 1
    """Tensor-parallel ranks (--tensor-model-parallel-size)."""
    data_parallel: int = 1
    """Data-parallel replicas; the world size is D x TP x DP."""
    virtual_stages: int | None = None
    """Chunks per rank for interleaved-1f1b and breadth-first (--virtual-pipeline-model-parallel-size)."""
    max_inflight: int | None = None
    """BitPipe's knob: microbatches in flight per pipeline (--max-inflight)."""
    pipeline_rank_order: str = "consecutive"
    """consecutive, or replica-pairs: pipeline ranks r and D-1-r placed next to each other (one node)."""

    @property
    def world_size(self) -> int:
        return self.pipeline_parallel * self.tensor_parallel * self.data_parallel

    def options(self) -> dict[str, int]:
        """The registry options this layout sets."""
        chosen = {"vp": self.virtual_stages, "max_inflight": self.max_inflight}
        return {key: value for key, value in chosen.items() if value is not None}

    @property
    def choice(self) -> ScheduleChoice:
        """The schedule with this layout's options (a new value each time: its build is not kept)."""
        return ScheduleChoice(self.schedule, tuple(sorted(self.options().items())))

    def label(self) -> str:
        parts = [self.schedule, f"pp{self.pipeline_parallel}"]
        parts += [f"tp{self.tensor_parallel}"] if self.tensor_parallel > 1 else []
        parts += [f"dp{self.data_parallel}"] if self.data_parallel > 1 else []
        parts += [f"vp{self.virtual_stages}"] if self.virtual_stages else []
        parts += [f"inflight{self.max_inflight}"] if self.max_inflight else []
        parts += ["pairs"] if self.pipeline_rank_order == "replica-pairs" else []
        return "-".join(parts)


@dataclass(frozen=True)
class LaunchConfig:
    """One training job: a model, a cluster, a layout and the job's settings."""

    model: ModelConfig
    """Model config: a path relative to this file, or a name in <configs>/models."""
    cluster: ClusterConfig
    """Cluster config: a path relative to this file, or a name in <configs>/clusters."""
    schedule: str
    """Pipeline schedule (--pipeline-schedule)."""
    pipeline_parallel: int
    """Pipeline ranks D."""
    nodes: int = 1
    """Nodes of the job (sbatch --nodes); with gpus_per_node they give the world size."""
    gpus_per_node: int | None = None
    """GPUs used on each node (torchrun --nproc-per-node); the cluster's when left out."""
    tensor_parallel: int = 1
    """Tensor-parallel ranks."""
    virtual_stages: int | None = None
    """Chunks per rank for interleaved-1f1b and breadth-first."""
    max_inflight: int | None = None
    """BitPipe's knob (--max-inflight)."""
    pipeline_rank_order: str = "consecutive"
    """consecutive or replica-pairs (--pipeline-rank-order)."""
    launcher: str = "trainer"
    """trainer (python -m megatron_bitpipe.train) or megatron-lm (pretrain_gpt.py through our launcher)."""
    train_iters: int = 100
    """Optimizer steps (--train-iters)."""
    lr: float = 1e-4
    """Learning rate (--lr)."""
    data_path: str | None = None
    """Megatron-LM --data-path; mock data when left out."""
    save: str | None = None
    """Checkpoint folder (--save, and --load to resume)."""
    save_interval: int | None = None
    """Iterations between checkpoints (--save-interval)."""
    job_name: str | None = None
    """Slurm job name; megatron-bitpipe-<model>-<layout> when left out."""
    partition: str | None = None
    """Slurm partition (#SBATCH --partition)."""
    account: str | None = None
    """Slurm account (#SBATCH --account)."""
    time: str = "01:00:00"
    """Slurm time limit (#SBATCH --time)."""
    log_dir: str = "logs"
    """Folder of the job logs (one file per job: %x-%j.out)."""
    megatron_lm_path: str = "$MEGATRON_LM_PATH"
    """Megatron-LM checkout on the cluster (launcher megatron-lm)."""
    python: str = "python"
    """Python on the nodes, with megatron-bitpipe installed."""
    extra_args: tuple[str, ...] = ()
    """More trainer or Megatron-LM arguments, appended as given."""

    def rules(self) -> list[tuple[str, str]]:
        broken = _positive(self, "pipeline_parallel", "nodes", "tensor_parallel", "train_iters")
        if self.gpus_per_node is not None and not 0 < self.gpus_per_node <= self.cluster.gpus_per_node:
            broken.append(("gpus_per_node", f"{self.gpus_per_node} must be in 1..{self.cluster.gpus_per_node} "
                                            f"(the cluster's GPUs per node)"))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            broken.append(("lr", f"{self.lr} must be positive and finite"))
        if self.launcher not in LAUNCHERS:
            broken.append(("launcher", f"{self.launcher!r} must be one of {', '.join(LAUNCHERS)}"))
        if self.pipeline_rank_order not in RANK_ORDERS:
            broken.append(("pipeline_rank_order", f"{self.pipeline_rank_order!r} must be one of {', '.join(RANK_ORDERS)}"))
        if self.save_interval is not None and self.save_interval <= 0:
            broken.append(("save_interval", f"{self.save_interval} must be positive"))
        if broken:
            return broken
        world = self.nodes * self.node_gpus
        if world % (self.pipeline_parallel * self.tensor_parallel):
            broken.append(("pipeline_parallel", f"{self.nodes} nodes x {self.node_gpus} GPUs = {world} "
                                                f"must be a multiple of pipeline_parallel x tensor_parallel = "
                                                f"{self.pipeline_parallel * self.tensor_parallel}"))
        elif self.model.global_batch_size % (self.model.micro_batch_size * self.data_parallel):
            broken.append(("model", f"global_batch_size {self.model.global_batch_size} must be a multiple of "
                                    f"micro_batch_size x data parallel = {self.model.micro_batch_size * self.data_parallel}"))
        return broken

    @property
    def node_gpus(self) -> int:
        """GPUs (processes) per node."""
        return self.gpus_per_node or self.cluster.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return self.nodes * self.node_gpus // (self.pipeline_parallel * self.tensor_parallel)

    @classmethod
    def for_layout(cls, model: ModelConfig, cluster: ClusterConfig, layout: Layout, **settings: Any) -> LaunchConfig:
        """A job running ``layout``: whole nodes of ``cluster``, or one node's share; ``settings``
        are any other LaunchConfig keys."""
        gpus = cluster.gpus_per_node
        if layout.world_size % gpus and layout.world_size > gpus:
            raise ValueError(f"{layout.label()}: world size {layout.world_size} is not whole nodes of {gpus} GPUs")
        return cls(
            model=model, cluster=cluster, schedule=layout.schedule, pipeline_parallel=layout.pipeline_parallel,
            nodes=max(1, layout.world_size // gpus), gpus_per_node=min(gpus, layout.world_size),
            tensor_parallel=layout.tensor_parallel, virtual_stages=layout.virtual_stages,
            max_inflight=layout.max_inflight, pipeline_rank_order=layout.pipeline_rank_order, **settings,
        )

    def layout(self) -> Layout:
        return Layout(self.schedule, self.pipeline_parallel, self.tensor_parallel, self.data_parallel,
                      self.virtual_stages, self.max_inflight, self.pipeline_rank_order)


@dataclass(frozen=True)
class SweepConfig:
    """A grid of layouts of one model on one cluster, simulated (and optionally run)."""

    model: ModelConfig
    """Model config: a path relative to this file, or a name in <configs>/models."""
    cluster: ClusterConfig
    """Cluster config: a path relative to this file, or a name in <configs>/clusters."""
    schedules: tuple[str, ...]
    """Schedules to compare."""
    pipeline_parallel: tuple[int, ...]
    """Values of D."""
    microbatches: tuple[int, ...]
    """Microbatches per step N; the global batch is N x micro_batch_size x DP."""
    tensor_parallel: tuple[int, ...] = (1,)
    """Values of TP."""
    data_parallel: tuple[int, ...] = (1,)
    """Values of DP."""
    virtual_stages: tuple[int, ...] = (2,)
    """Values of vp, for schedules that take it (others ignore it)."""
    max_inflight: tuple[int | None, ...] = (None,)
    """Values of BitPipe's knob (null: its default); other schedules ignore it."""
    pipeline_rank_orders: tuple[str, ...] = ("consecutive",)
    """consecutive and/or replica-pairs, for two-pipeline schedules (others: consecutive)."""
    gpus: tuple[int, ...] = ()
    """Keep only layouts of these world sizes (PP x TP x DP); empty: every combination."""
    launch: dict[str, Any] = field(default_factory=dict)
    """Launch settings for --submit (any LaunchConfig key but model, cluster and the layout)."""

    def rules(self) -> list[tuple[str, str]]:
        broken = []
        for key in ("pipeline_parallel", "microbatches", "tensor_parallel", "data_parallel", "virtual_stages"):
            values = getattr(self, key)
            if not values:
                broken.append((key, "must list at least one value"))
            elif any(value <= 0 for value in values):
                broken.append((key, f"{list(values)}: every value must be positive"))
        if not self.schedules:
            broken.append(("schedules", "must list at least one schedule"))
        settable = {item.name for item in fields(LaunchConfig)} - LAYOUT_KEYS
        for key in sorted(set(self.launch) - settable):
            broken.append(("launch", f"unknown launch setting {key!r} (known: {', '.join(sorted(settable))})"))
        for order in self.pipeline_rank_orders:
            if order not in RANK_ORDERS:
                broken.append(("pipeline_rank_orders", f"{order!r} must be one of {', '.join(RANK_ORDERS)}"))
        return broken


LAYOUT_KEYS = {"model", "cluster", "schedule", "pipeline_parallel", "tensor_parallel", "virtual_stages",
               "max_inflight", "pipeline_rank_order", "nodes", "gpus_per_node"}
"""LaunchConfig keys a sweep point sets itself."""
Config = TypeVar("Config")
NESTED = {ModelConfig: "models", ClusterConfig: "clusters"}


def load_model(path: str | Path) -> ModelConfig:
    return load(path, ModelConfig)


def load_cluster(path: str | Path) -> ClusterConfig:
    return load(path, ClusterConfig)


def load_sweep(path: str | Path) -> SweepConfig:
    return load(path, SweepConfig)


def load_launch(path: str | Path) -> LaunchConfig:
    return load(path, LaunchConfig)


def load(path: str | Path, kind: type[Config]) -> Config:
    """``path`` read as a ``kind`` config; ``ConfigError`` names the file, the key and the rule."""
    path = Path(path)
    try:
        import yaml
    except ImportError as error:  # pragma: no cover - pyyaml is a dependency
        raise ConfigError(f"{path}: reading configs needs pyyaml (pip install pyyaml)") from error
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}: {getattr(error, 'problem', error)}") from None
    config = from_mapping(data, kind, path)
    if isinstance(config, ClusterConfig):
        config = _cluster_files(config, path)
    return config


def _cluster_files(cluster: ClusterConfig, path: Path) -> ClusterConfig:
    """``cluster`` with its cost files resolved (relative to ``path``) and checked, and a GPU
    kind's costs filled in."""
    if cluster.layer_costs is None and cluster.achieved_tflops is None and cluster.gpu is not None:
        measured, rate = GPU_KINDS[cluster.gpu]
        cluster = replace(cluster, layer_costs=str(CONFIGS / measured) if measured else None, achieved_tflops=rate)
    elif cluster.layer_costs is not None:
        costs = path.parent / cluster.layer_costs
        if not costs.is_file():
            raise ConfigError(f"{path}: layer_costs: {costs} is not a file")
        cluster = replace(cluster, layer_costs=str(costs.resolve()))
    if cluster.measured_costs is not None:
        from megatron_bitpipe.scale import measured_costs

        costs = path.parent / cluster.measured_costs
        if not costs.is_file():
            raise ConfigError(f"{path}: measured_costs: {costs} is not a file")
        try:
            measured_costs.load(costs)
        except (ValueError, TypeError, KeyError) as error:
            raise ConfigError(f"{path}: measured_costs: {costs} is not a costs.json "
                              f"(megatron-bitpipe bench writes one): {error}") from None
        cluster = replace(cluster, measured_costs=str(costs.resolve()))
    return cluster


def from_mapping(data: Any, kind: type[Config], path: Path) -> Config:
    """Build ``kind`` from a parsed mapping, checking keys, types and rules."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {kind.__name__} keys, got {type(data).__name__}")
    known = {item.name: item for item in fields(kind)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    hints = typing.get_type_hints(kind)
    values = {}
    for name, item in known.items():
        if name not in data:
            if item.default is MISSING and item.default_factory is MISSING:
                raise ConfigError(f"{path}: missing key {name!r} ({_doc(kind, name)})")
            continue
        values[name] = _convert(data[name], hints[name], path, name)
    config = kind(**values)
    for key, rule in config.rules():
        raise ConfigError(f"{path}: {key}: {rule}")
    return config


def _convert(value: Any, hint: Any, path: Path, key: str) -> Any:
    """``value`` checked against ``hint`` (and nested configs loaded from their files)."""
    if hint in NESTED:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key}: expected a path or a name of a {NESTED[hint][:-1]} config")
        return load(_resolve(path, value, NESTED[hint]), hint)
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        inner = [argument for argument in arguments if argument is not type(None)]
        return _convert(value, inner[0], path, key)
    if origin is tuple:
        if not isinstance(value, list):
            value = [value]
        return tuple(_convert(item, arguments[0], path, key) for item in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key}: expected a mapping, got {_shown(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: {key}: expected {hint.__name__}, got {_shown(value)}")
    return value


def _resolve(path: Path, value: str, folder: str) -> Path:
    """A nested config: relative to ``path``'s folder, or a bare name in <configs>/``folder``."""
    if "/" not in value and not value.endswith((".yaml", ".yml")):
        return path.resolve().parent.parent / folder / f"{value}.yaml"
    return path.parent / value


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _doc(kind: type, name: str) -> str:
    return FIELD_DOCS.get(kind, {}).get(name, name)


def _positive(config: Any, *names: str) -> list[tuple[str, str]]:
    return [(name, f"{getattr(config, name)} must be positive") for name in names
            if not getattr(config, name) > 0]


def _non_negative(config: Any, *names: str) -> list[tuple[str, str]]:
    return [(name, f"{getattr(config, name)} must not be negative") for name in names
            if not getattr(config, name) >= 0]


def _field_docs(kind: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(kind))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for statement, following in zip(body, body[1:]):
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[statement.target.id] = str(following.value.value)
    return docs


FIELD_DOCS = {kind: _field_docs(kind) for kind in (ModelConfig, ClusterConfig, Layout, LaunchConfig, SweepConfig)}
"""Field docstrings by config class, for error messages and the tests that every field has one."""
