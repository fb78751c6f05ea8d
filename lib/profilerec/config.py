"""Job configurations: one dataclass per job, loaded from YAML and command-line flags.

Every field has a default that runs on a laptop. A job reads `--config file.yaml` first, then
applies `--field value` flags on top (`--section.field value` for nested sections), so the same
command works locally and under `ray job submit`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

import yaml
from profilerec.errors import ConfigError

T = TypeVar("T")

DEFAULT_WORK_DIR = "work"
SHARED_DATA = os.path.join("..", "shared", "data")


def default_data_path() -> str:
    """Amazon Industrial in ../shared/data (next to the working directory or to the checkout this
    package is installed from), else the sample bundled with the package."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for base in (os.getcwd(), checkout):
        shared = os.path.join(base, SHARED_DATA, "amazon-industrial")
        if os.path.isdir(shared):
            return os.path.normpath(shared)
    return os.path.join(os.path.dirname(__file__), "sample_data", "amazon-industrial-sample")


@dataclass
class RayConfig:
    """How a job reaches Ray: `auto` joins a running cluster if there is one, else starts a local one."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None  # only for a local instance; None lets Ray count the cores


@dataclass
class PrepareConfig:
    """jobs/prepare.py: a source folder or file -> canonical Parquet under `output`."""

    source: str = "amazon"  # amazon | movielens | generic
    input: str = field(default_factory=default_data_path)
    output: str = f"{DEFAULT_WORK_DIR}/prepared"
    # generic source only: canonical column name -> column name in the input files
    events_file: str = "events.csv"
    items_file: str = "items.csv"
    columns: dict[str, str] = field(default_factory=dict)
    # keep only this many users (the first ones in a stable hash order); None keeps all
    sample_users: Optional[int] = None
    # with sample_users: also cut the catalog to the items those users touched (a fast demo;
    # metrics on a cut catalog are not comparable with published full-catalog figures)
    sample_items: bool = False
    # evaluation protocol for logs without a published split: hold out each user's last positive
    # event (test) and the one before (valid)
    positive_min_value: float = 4.0


@dataclass
class EncodeConfig:
    """jobs/encode.py: item texts and event texts -> embeddings Parquet, on a Ray Data actor pool."""

    input: str = f"{DEFAULT_WORK_DIR}/prepared"
    output: str = f"{DEFAULT_WORK_DIR}/embeddings"
    model: str = "default"  # "default" = bundled all-MiniLM-L6-v2; or a local folder / hub id
    batch_size: int = 64
    max_length: int = 128
    # padded tokens per model call: texts are sorted by token length and batched up to this budget
    # (at most 8 x batch_size rows), so short texts go in big batches and nothing pads to 128
    token_budget: int = 2048
    # auto: bf16 on GPUs and on CPUs with bf16 matrix hardware (AMX), else fp32; int8 (CPU, dynamic
    # quantisation: faster, but some vectors fall below cosine 0.99 to fp32, see docs/encoding.md); fp32; bf16
    precision: str = "auto"
    num_actors: int = 1
    num_gpus_per_actor: Optional[float] = None  # None: 1 when the cluster has GPUs, else 0
    num_cpus_per_actor: float = 1.0
    # torch threads per CPU encoder actor; None: the cores of the machine / num_actors (Ray itself
    # would leave each worker one thread)
    torch_threads: Optional[int] = None
    include_event_texts: bool = True
    # vectors already computed, keyed by model fingerprint and text hash; None: <output>/cache
    cache: Optional[str] = None
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class FinetuneConfig:
    """jobs/finetune.py: Ray Train fine-tuning of the encoder on next-item prediction."""

    input: str = f"{DEFAULT_WORK_DIR}/prepared"
    output: str = f"{DEFAULT_WORK_DIR}/model"
    model: str = "default"
    epochs: int = 1
    max_steps_per_epoch: Optional[int] = None  # cap for quick runs; None = whole epoch
    batch_size: int = 32
    max_length: int = 64
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 0.05
    patience: int = 1  # early stopping: epochs without a better validation NDCG@10
    eval_max_cases: Optional[int] = 1000  # validation cases scored each epoch
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    eval_split: str = "valid"
    num_workers: int = 1
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    # torch threads per worker; None: the node's cores shared by the workers on it (Ray starts
    # workers with OMP_NUM_THREADS=1, which would leave all but one core idle)
    threads_per_worker: Optional[int] = None
    # bf16 autocast (mixed precision); None: on for CUDA GPUs that support bf16 and for CPUs with
    # bf16 matrix hardware (AMX), off elsewhere
    bf16: Optional[bool] = None
    seed: int = 0
    storage_path: Optional[str] = None  # Ray Train checkpoints; None = <output>/../ray_train
    run_name: str = "profilerec-finetune"
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class ScorerConfig:
    """Architecture of the profile scorer (model/scorer.py), saved with it. Each switch is one ablation."""

    id_embeddings: bool = False  # learned per-item vectors next to the text (overfit small logs)
    attention: bool = True  # attention over the recent window (position, time gap, event type)
    interests: bool = True  # the long- and short-term interest vectors in the user vector
    repeat: bool = True  # a learned bonus for items already in the window, by position
    transitions: bool = True  # what users touched next after each window item, from the log
    popularity: bool = True  # the log-count of each item
    transition_span: int = 1  # count pairs up to this many events apart
    dropout: float = 0.2
    types: list[str] = field(default_factory=lambda: [
        "view", "click", "cart", "purchase", "review", "rating", "search", "tag"])


@dataclass
class TrainConfig:
    """jobs/train.py: Ray Train fitting of the profile scorer on next-item prediction.

    Epochs are chosen on `eval_split` (early stopping on NDCG@10); with `refit` the scorer is then
    trained again from scratch on the training splits plus `eval_split` for that many epochs
    (those events precede later splits), and that model is the one written and served.
    """

    input: str = f"{DEFAULT_WORK_DIR}/prepared"
    embeddings: str = f"{DEFAULT_WORK_DIR}/embeddings/base"
    output: str = f"{DEFAULT_WORK_DIR}/model"
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    epochs: int = 15  # at most; the refit trains as many as validation chose
    patience: int = 3
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    eval_split: str = "valid"
    refit: bool = True
    num_workers: int = 1
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    threads_per_worker: Optional[int] = None  # None: the node's cores shared by the workers on it
    seed: int = 0
    storage_path: Optional[str] = None  # Ray Train checkpoints; None = <output>/../ray_train
    run_name: str = "profilerec-train"
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class BenchmarkConfig:
    """jobs/benchmark.py: the ablation table from scratch (see cli/quality_benchmark.py): prepare, encode,
    train every variant with Ray Train, evaluate valid and test. Stages whose output already
    exists under `work_dir` are reused."""

    work_dir: str = f"{DEFAULT_WORK_DIR}/benchmark"
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablation: bool = True  # every row of the ablation; false: only the default configuration
    finetune_encoder: bool = False  # add the "+ fine-tuned encoder" row (slow on a CPU)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=1, max_steps_per_epoch=40))
    ks: list[int] = field(default_factory=lambda: [3, 5, 10])
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class ProfilesConfig:
    """jobs/profiles.py: every user's profile state built in batch from the event log."""

    input: str = f"{DEFAULT_WORK_DIR}/prepared"
    embeddings: str = f"{DEFAULT_WORK_DIR}/embeddings"
    model: str = f"{DEFAULT_WORK_DIR}/model"
    output: str = f"{DEFAULT_WORK_DIR}/profiles"
    workers: Optional[int] = None  # processes building profiles; None: one per core, 1: in this process


@dataclass
class EvaluateConfig:
    """jobs/evaluate.py: full-ranking replay evaluation with baselines, report as JSON/Markdown/PNG."""

    input: str = f"{DEFAULT_WORK_DIR}/prepared"
    embeddings: str = f"{DEFAULT_WORK_DIR}/embeddings"
    model: str = f"{DEFAULT_WORK_DIR}/model"
    baseline_embeddings: Optional[str] = None  # embeddings of the untuned encoder, for the zero-shot line
    output: str = f"{DEFAULT_WORK_DIR}/report"
    method_name: str = "profilerec"
    split: str = "test"
    ks: list[int] = field(default_factory=lambda: [3, 5, 10])
    max_cases: Optional[int] = None
    baselines: bool = True
    workers: Optional[int] = None  # processes replaying cases; None: one per core, 1: in this process


@dataclass
class ServeConfig:
    """The Ray Serve application (serve/app.py): where its state lives and how it is sharded."""

    prepared: str = f"{DEFAULT_WORK_DIR}/prepared"
    embeddings: str = f"{DEFAULT_WORK_DIR}/embeddings"
    model: str = f"{DEFAULT_WORK_DIR}/model"
    profiles: Optional[str] = f"{DEFAULT_WORK_DIR}/profiles"  # popularity prior (and batch-built states)
    state_dir: str = f"{DEFAULT_WORK_DIR}/serve_state"
    num_shards: int = 2
    shard_num_cpus: float = 0.25
    snapshot_every: int = 50_000  # events per shard between snapshots
    # how long after a DELETE a late retry of one of the user's remembered events is still
    # recognised and ignored (instead of bringing the user back)
    tombstone_ttl_s: float = 7 * 24 * 3600.0
    # events stamped more than this after the service's clock are refused (422 naming ts) ...
    max_ahead_s: float = 300.0
    # ... and, when set, those older than this; older events are applied as late events
    # (profile.py: in arrival order, with no time gap)
    max_age_s: Optional[float] = None
    # how long an ingress replica waits for a shard on its node to answer a read before yielding
    # its event loop (read_channel.py: yielding costs Serve a disconnect watch); 0 = always yield
    read_wait_ms: float = 5.0
    # users per shard whose packed profile is kept in shared memory for the ingress replicas of
    # the node to score themselves (profile_board.py; 3.2 KB of the node's temp dir each, allocated
    # when the shard starts); 0 = every read goes to the shard
    board_users: int = 65_536
    host: str = "127.0.0.1"
    port: int = 8000
    token_env: str = "PROFILEREC_API_TOKEN"  # bearer token for writes, from this environment variable
    token_file: Optional[str] = None  # ... or from this file; default <state_dir>/api_token


@dataclass
class PipelineConfig:
    """jobs/pipeline.py (`profilerec demo`): every job in turn, then the live service.

    Input and output locations of the sections are derived from `work_dir`; the other settings
    of each section apply as in the job's own config.
    """

    work_dir: str = DEFAULT_WORK_DIR
    # a few hundred real users and the items they touched: the whole workflow in minutes
    prepare: PrepareConfig = field(default_factory=lambda: PrepareConfig(sample_users=400, sample_items=True))
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=1, max_steps_per_epoch=40))
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # fine-tune the encoder too (slow on a CPU; on Amazon it did not beat the untuned encoder)
    run_finetune: bool = False
    run_service: bool = True  # start the service and send the demo requests
    keep_serving: bool = False  # leave the service running (Ctrl-C stops it)
    ray: RayConfig = field(default_factory=RayConfig)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(cls: type[T], argv: Optional[list[str]] = None) -> T:
    """Build a `cls` from `--config FILE` (YAML) and `--name value` flags, flags winning."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values: dict[str, Any] = {}
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        values = read_yaml_config(argv[at + 1])
        del argv[at : at + 2]
    for name, raw in _pairs(argv):
        _set_dotted(values, name, yaml.safe_load(raw) if raw != "" else "")
    return from_dict(cls, values)


def read_yaml_config(path: str) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a ConfigError naming the path."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a plain mapping, checking names and types of every value."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown setting {where}{unknown[0]!s}; known settings of {cls.__name__}: "
            + ", ".join(sorted(known))
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in values.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for logs, reports and saved artifacts)."""
    return dataclasses.asdict(config)


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: settings are given as --name value")
        if "=" in arg:
            name, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"setting {arg} needs a value")
            name, raw = arg[2:], argv[i + 1]
            i += 2
        pairs.append((name.replace("-", "_"), raw))
    return pairs


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"setting {name} must be a section (mapping), got {value!r}")
        return from_dict(tp, value, where=f"{name}.")
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(args[0], v, f"{name}[]") for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"setting {name} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"setting {name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"setting {name} must be a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"setting {name} must be a number, got {value!r}")
    if tp is str:
        return str(value)
    return value
