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


def setting(default: Any = dataclasses.MISSING, help: str = "", *,
            factory: Any = dataclasses.MISSING) -> Any:
    """A config field and its one-line description: the description is what `profilerec <job>
    --help` prints next to the setting, so the code and the help cannot drift apart."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def setting_help(f: dataclasses.Field) -> str:
    """The description a field was declared with (empty for a plain dataclass field)."""
    return f.metadata.get("help", "")


@dataclass
class RayConfig:
    """How a job reaches Ray: the cluster at `address` (`auto`: the one `ray start` runs on this
    machine), else a new local instance of the job's own."""

    address: Optional[str] = setting(
        None, "Ray cluster to join (host:port, auto, ray://host:port); none: RAY_ADDRESS, else a local instance")
    num_cpus: Optional[int] = setting(None, "CPUs of a local instance; none lets Ray count the cores")


@dataclass
class ConsoleConfig:
    """What a job prints: its own story on the terminal, Ray's logs in a file (every job)."""

    verbose: bool = setting(False, "show Ray's own logs, progress and workers' output on the terminal too")
    log_dir: Optional[str] = setting(
        None, "folder of the job's log file; none: logs/ in the work folder (beside the job's output)")


@dataclass
class PrepareConfig:
    """jobs/prepare.py: a source folder or file -> canonical Parquet under `output`."""

    source: str = setting("amazon", "format of the input: amazon | movielens | generic")
    input: str = setting(factory=default_data_path,
                         help="source folder or file; default: ../shared/data/amazon-industrial beside the working "
                              "directory or the checkout, else the sample bundled with the package")
    output: str = setting(f"{DEFAULT_WORK_DIR}/prepared", "folder the canonical Parquet is written to")
    events_file: str = setting("events.csv", "generic source only: the events file inside input")
    items_file: str = setting("items.csv", "generic source only: the items file inside input")
    columns: dict[str, str] = setting(
        factory=dict, help="generic source only: canonical column name -> column name in the input files")
    sample_users: Optional[int] = setting(
        None, "keep only this many users (the first ones in a stable hash order); none keeps all")
    sample_items: bool = setting(
        False, "with sample_users: also cut the catalog to the items those users touched (a fast demo; "
               "metrics on a cut catalog are not comparable with published full-catalog figures)")
    positive_min_value: float = setting(
        4.0, "logs without a published split: a rating at least this is a positive event; each user's last "
             "positive event is held out for test and the one before for valid")


@dataclass
class EncodeConfig:
    """jobs/encode.py: item texts and event texts -> embeddings Parquet, on a Ray Data actor pool."""

    input: str = setting(f"{DEFAULT_WORK_DIR}/prepared", "prepared folder (output of prepare)")
    output: str = setting(f"{DEFAULT_WORK_DIR}/embeddings", "folder the embeddings are written to")
    model: str = setting("default", "text encoder: default (bundled all-MiniLM-L6-v2), a local folder or a hub id")
    batch_size: int = setting(64, "texts per model call (at most 8 x this with token_budget)")
    max_length: int = setting(128, "tokens kept of each text")
    token_budget: Optional[int] = setting(
        None, "tokens per model call: texts are sorted by length and batched up to this budget, so short "
              "texts go in big batches; none: by device (batch_size x 32 on CPUs, from free memory on GPUs)")
    precision: str = setting(
        "auto", "auto (the fastest on the encoder's device within cosine 0.999 of fp32, measured once and "
                "kept in the cache's precision.json) | fp32 | tf32 | bf16 | fp16 (tf32, fp16: CUDA only) | "
                "int8 (CPU only: faster, some vectors below cosine 0.99 to fp32, see docs/encoding.md)")
    packing: str = setting(
        "auto", "auto | on | off: run the encoder on packed, unpadded texts (BERT-family models); auto: where "
                "it measured faster (docs/encoding.md)")
    num_actors: int = setting(1, "encoder actors in the Ray Data pool")
    num_gpus_per_actor: Optional[float] = setting(
        None, "GPUs per encoder actor; none: 1 when the cluster has GPUs, else 0")
    num_cpus_per_actor: float = setting(1.0, "CPUs Ray reserves per encoder actor")
    torch_threads: Optional[int] = setting(
        None, "torch threads per CPU encoder actor; none: the machine's cores / num_actors")
    include_event_texts: bool = setting(True, "also encode the texts of events (reviews, searches)")
    cache: Optional[str] = setting(
        None, "vectors already computed, keyed by model and text hash; none: <output>/cache")
    ray: RayConfig = setting(factory=RayConfig, help="how the job reaches Ray")


@dataclass
class FinetuneConfig:
    """jobs/finetune.py: Ray Train fine-tuning of the encoder on next-item prediction."""

    input: str = setting(f"{DEFAULT_WORK_DIR}/prepared", "prepared folder (output of prepare)")
    output: str = setting(f"{DEFAULT_WORK_DIR}/model", "folder the fine-tuned encoder goes to (<output>/encoder)")
    model: str = setting("default", "encoder to start from: default (bundled all-MiniLM-L6-v2), a folder or a hub id")
    epochs: int = setting(1, "training epochs at most")
    max_steps_per_epoch: Optional[int] = setting(None, "cap for quick runs; none: the whole epoch")
    batch_size: int = setting(32, "training cases per step (per worker)")
    max_length: int = setting(64, "tokens kept of each text")
    learning_rate: float = setting(2e-5, "AdamW learning rate")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup_ratio: float = setting(0.1, "share of the steps with a linear learning-rate warm-up")
    temperature: float = setting(0.05, "softmax temperature of the contrastive loss")
    patience: int = setting(1, "early stopping: epochs without a better validation NDCG@10")
    eval_max_cases: Optional[int] = setting(1000, "validation cases scored each epoch; none: all")
    train_splits: list[str] = setting(factory=lambda: ["train"], help="splits whose cases are trained on")
    eval_split: str = setting("valid", "split the epochs are judged on")
    num_workers: int = setting(1, "Ray Train workers (one per GPU on a GPU cluster)")
    use_gpu: Optional[bool] = setting(None, "none: use GPUs when the cluster has them")
    threads_per_worker: Optional[int] = setting(
        None, "torch threads per worker; none: the node's cores shared by the workers on it")
    bf16: Optional[bool] = setting(
        None, "bf16 autocast; none: on for CUDA GPUs with bf16 and CPUs with AMX, off elsewhere")
    seed: int = setting(0, "random seed")
    storage_path: Optional[str] = setting(None, "Ray Train checkpoints; none: <output>/../ray_train")
    run_name: str = setting("profilerec-finetune", "Ray Train run name (a fingerprint of the settings is added)")
    ray: RayConfig = setting(factory=RayConfig, help="how the job reaches Ray")


@dataclass
class ScorerConfig:
    """Architecture of the profile scorer (model/scorer.py), saved with it. Each switch is one ablation."""

    id_embeddings: bool = setting(False, "learned per-item vectors next to the text (overfit small logs)")
    attention: bool = setting(True, "attention over the recent window (position, time gap, event type)")
    interests: bool = setting(True, "the long- and short-term interest vectors in the user vector")
    repeat: bool = setting(True, "a learned bonus for items already in the window, by position")
    transitions: bool = setting(True, "what users touched next after each window item, from the log")
    popularity: bool = setting(True, "the log-count of each item")
    transition_span: int = setting(1, "count item pairs up to this many events apart")
    reverse_transitions: bool = setting(
        True, "also what users touched before each window item (the transitions read backwards), by position")
    user_transform: bool = setting(
        False, "a learned linear map on the user vector, so that an item can point to different items than "
               "resemble it (the item side keeps the shared projection)")
    dropout: float = setting(0.2, "dropout in the user vector")
    types: list[str] = setting(factory=lambda: [
        "view", "click", "cart", "purchase", "review", "rating", "search", "tag"], help="event types the scorer knows")


@dataclass
class SecondStageConfig:
    """The second stage (model/second_stage.py): a small network that reorders the scorer's top
    items, fitted on the cases of the training job's `eval_split` once the scorer's epochs are
    chosen. Its settings are the ones measured on folds of Amazon Industrial's valid split, not tuned
    further (docs/results)."""

    depth: int = setting(50, "first-stage items it reorders; 0: no second stage (the scorer's order)")
    hidden: int = setting(32, "units of its hidden layer")
    epochs: int = setting(40, "passes over the fitting cases")
    batch_size: int = setting(128, "cases per step")
    learning_rate: float = setting(3e-3, "AdamW learning rate")
    weight_decay: float = setting(1e-3, "AdamW weight decay")
    folds: int = setting(2, "its validation figure is cross-fitted: fitted on all folds but one, measured on "
                            "that one, for each fold")
    min_cases: int = setting(100, "fitting cases (target among the first `depth`) it needs; fewer: no second "
                                  "stage, and the job says so")
    only_if_better: bool = setting(True, "write it only when its cross-fitted validation NDCG@10 is above the "
                                         "scorer's alone (else the job says so and serves the scorer's order)")


@dataclass
class TrainConfig:
    """jobs/train.py: Ray Train fitting of the profile scorer on next-item prediction.

    Epochs are chosen on `eval_split` (early stopping on NDCG@10); the second stage is then fitted
    on the cases of `eval_split` (second_stage). With `refit` (and no second stage) the scorer is
    instead trained again from scratch on the training splits plus `eval_split` for that many
    epochs (those events precede later splits), and that model is the one written and served.
    """

    input: str = setting(f"{DEFAULT_WORK_DIR}/prepared", "prepared folder (output of prepare)")
    embeddings: str = setting(f"{DEFAULT_WORK_DIR}/embeddings/base", "embeddings folder (output of encode)")
    output: str = setting(f"{DEFAULT_WORK_DIR}/model", "folder the scorer goes to (<output>/scorer)")
    scorer: ScorerConfig = setting(factory=ScorerConfig, help="architecture of the scorer")
    epochs: int = setting(15, "epochs at most; the refit trains as many as validation chose")
    patience: int = setting(3, "early stopping: epochs without a better validation NDCG@10")
    batch_size: int = setting(128, "training cases per step (per worker)")
    learning_rate: float = setting(3e-3, "AdamW learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    projection_lr: float = setting(
        0.1, "the item projection's learning rate as a multiple of learning_rate (a tenth: the projection of "
             "the text moves slowly while the scalar and graph weights learn; better on valid, docs/results)")
    loss: str = setting(
        "auto", "full: softmax over every item; sampled: the targets of the batch plus sampled negatives, "
                "logQ-corrected; auto: sampled from `sampled_from` items on")
    sampled_from: int = setting(
        200_000, "loss auto: catalogs of at least this many items train with the sampled loss, smaller ones with "
                 "the full softmax (the one the published quality figures were measured with)")
    # a step projects the batch's window items anyway (up to batch_size x the profile's window rows,
    # 128 x 20 at the defaults): 1024 draws stay below that cost, and the sampled loss's bias
    # shrinks as the draws grow
    negatives: int = setting(
        1024, "sampled loss: negatives drawn per step (shared by the batch) besides the batch's own targets")
    train_splits: list[str] = setting(factory=lambda: ["train"], help="splits whose cases are trained on")
    eval_split: str = setting("valid", "split the epochs are chosen on")
    refit: bool = setting(False, "train again on the training splits + eval_split for the chosen epochs (only "
                                 "without a second stage: both would learn from eval_split's targets)")
    second_stage: SecondStageConfig = setting(factory=SecondStageConfig,
                                              help="the network reordering the scorer's top items")
    num_workers: int = setting(1, "Ray Train workers (one per GPU on a GPU cluster)")
    use_gpu: Optional[bool] = setting(None, "none: use GPUs when the cluster has them")
    threads_per_worker: Optional[int] = setting(
        None, "torch threads per worker; none: the node's cores shared by the workers on it")
    seed: int = setting(0, "random seed")
    storage_path: Optional[str] = setting(None, "Ray Train checkpoints; none: <output>/../ray_train")
    run_name: str = setting("profilerec-train", "Ray Train run name (a fingerprint of the settings is added)")
    ray: RayConfig = setting(factory=RayConfig, help="how the job reaches Ray")


@dataclass
class BenchmarkConfig:
    """jobs/benchmark.py: the ablation table from scratch (see cli/quality_benchmark.py): prepare, encode,
    train every variant with Ray Train, evaluate valid and test. Stages whose output already
    exists under `work_dir` are reused."""

    work_dir: str = setting(f"{DEFAULT_WORK_DIR}/benchmark", "folder of every stage's output and the report")
    prepare: PrepareConfig = setting(factory=PrepareConfig, help="the prepare stage")
    encode: EncodeConfig = setting(factory=EncodeConfig, help="the encode stage")
    train: TrainConfig = setting(factory=TrainConfig, help="training of each variant")
    ablation: bool = setting(True, "every row of the ablation; false: only the default configuration")
    finetune_encoder: bool = setting(False, "add the + fine-tuned encoder row (slow on a CPU)")
    finetune: FinetuneConfig = setting(factory=lambda: FinetuneConfig(epochs=1, max_steps_per_epoch=40),
                                       help="the encoder fine-tune (with finetune_encoder)")
    ks: list[int] = setting(factory=lambda: [3, 5, 10], help="cut-offs of HR@K and NDCG@K")
    ray: RayConfig = setting(factory=RayConfig, help="how the job reaches Ray")


@dataclass
class IndexConfig:
    """jobs/index.py: the nearest-neighbour index (IVF, model/ann.py) over the item vectors the
    scorer compares profiles with, from which two-stage recommendations take their candidates."""

    input: str = setting(f"{DEFAULT_WORK_DIR}/prepared", "prepared folder (output of prepare): the catalog")
    embeddings: str = setting(f"{DEFAULT_WORK_DIR}/embeddings", "embeddings folder (output of encode)")
    model: str = setting(f"{DEFAULT_WORK_DIR}/model", "model folder (output of train); without a scorer, the "
                                                      "index holds the text vectors")
    output: str = setting(f"{DEFAULT_WORK_DIR}/index", "folder the index and its manifest are written to")
    lists: Optional[int] = setting(None, "clusters the vectors are split into; none: about 4 sqrt(items)")
    probes: Optional[int] = setting(None, "clusters a search scans (more: better recall, slower); none: the "
                                          "fewest that reach target_recall on the sample queries")
    target_recall: float = setting(0.95, "recall@100 against exact search that the chosen probes must reach")
    recall_queries: int = setting(1000, "queries recall is measured on (against exact search): profiles replayed "
                                        "from the log's validation cases, or mixes of item vectors without cases")
    threads: Optional[int] = setting(None, "threads building the index; none: every core")
    serving_state: str = setting("", "the service's state_dir: index the items it learned while serving "
                                     "(PUT /v1/items) too, so that a running service swaps the rebuilt index "
                                     "in and stops searching them exactly; blank: the catalog only")


RETRIEVAL_MODES = ("auto", "exact", "two_stage")


@dataclass
class RetrievalConfig:
    """How a recommendation chooses the items it scores (model/retrieval.py): every item, or the
    candidates from the nearest-neighbour index that `profilerec index` builds."""

    mode: str = setting("auto", "exact: score every item; two_stage: score the candidates from the index; "
                                "auto: two_stage from two_stage_from items on")
    two_stage_from: int = setting(100_000, "catalog size from which auto scores candidates only")
    index: str = setting(f"{DEFAULT_WORK_DIR}/index", "the nearest-neighbour index (output of index)")
    nearest: int = setting(200, "candidates per profile from the index")
    popular: int = setting(50, "the most popular items: candidates of every profile")
    reload_s: float = setting(30.0, "seconds between a serving process's checks for a rebuilt index, "
                                    "which it then swaps in without a restart; 0: never")


@dataclass
class ProfilesConfig:
    """jobs/profiles.py: every user's profile state built in batch from the event log."""

    input: str = setting(f"{DEFAULT_WORK_DIR}/prepared", "prepared folder (output of prepare)")
    embeddings: str = setting(f"{DEFAULT_WORK_DIR}/embeddings", "embeddings folder (output of encode)")
    model: str = setting(f"{DEFAULT_WORK_DIR}/model", "model folder (output of train)")
    output: str = setting(f"{DEFAULT_WORK_DIR}/profiles", "folder the states and item priors are written to")
    workers: Optional[int] = setting(None, "processes building profiles; none: one per core, 1: in this process")


@dataclass
class EvaluateConfig:
    """jobs/evaluate.py: full-ranking replay evaluation with baselines, report as JSON/Markdown/PNG."""

    input: str = setting(f"{DEFAULT_WORK_DIR}/prepared", "prepared folder (output of prepare)")
    embeddings: str = setting(f"{DEFAULT_WORK_DIR}/embeddings", "embeddings folder (output of encode)")
    model: str = setting(f"{DEFAULT_WORK_DIR}/model", "model folder (output of train)")
    baseline_embeddings: Optional[str] = setting(
        None, "embeddings of the untuned encoder, for the zero-shot line; none: no such line")
    output: str = setting(f"{DEFAULT_WORK_DIR}/report", "folder the report is written to")
    method_name: str = setting("profilerec", "name of the evaluated model in the report")
    split: str = setting("test", "split whose cases are scored (train | valid | test)")
    ks: list[int] = setting(factory=lambda: [3, 5, 10], help="cut-offs of HR@K and NDCG@K")
    max_cases: Optional[int] = setting(None, "score only the first this many cases; none: all")
    baselines: bool = setting(True, "also score popularity and the zero-shot profile")
    two_stage: bool = setting(True, "also score with two-stage retrieval when retrieval.index holds an index: "
                                    "what the candidates cost in quality")
    retrieval: RetrievalConfig = setting(factory=RetrievalConfig, help="the two-stage line's candidates")
    workers: Optional[int] = setting(None, "processes replaying cases; none: one per core, 1: in this process")


@dataclass
class ServeConfig:
    """The Ray Serve application (serve/app.py): where its state lives and how it is sharded."""

    prepared: str = setting(f"{DEFAULT_WORK_DIR}/prepared", "prepared folder: the catalog served")
    embeddings: str = setting(f"{DEFAULT_WORK_DIR}/embeddings", "embeddings folder (output of encode)")
    model: str = setting(f"{DEFAULT_WORK_DIR}/model", "model folder (output of train)")
    profiles: Optional[str] = setting(
        f"{DEFAULT_WORK_DIR}/profiles", "popularity prior and batch-built states (output of profiles)")
    state_dir: str = setting(f"{DEFAULT_WORK_DIR}/serve_state", "write-ahead logs and snapshots of the shards")
    retrieval: RetrievalConfig = setting(factory=RetrievalConfig, help="the items a recommendation scores")
    num_shards: int = setting(2, "profile shard actors")
    shard_num_cpus: float = setting(0.25, "CPUs Ray reserves per shard actor")
    snapshot_every: int = setting(50_000, "events per shard between snapshots")
    tombstone_ttl_s: float = setting(
        7 * 24 * 3600.0, "how long after a DELETE a late retry of one of the user's remembered events is "
                         "still recognised and ignored (instead of bringing the user back)")
    max_ahead_s: float = setting(300.0, "events stamped more than this after the service's clock are refused (422)")
    max_age_s: Optional[float] = setting(
        None, "events older than this are refused too; none: older events are applied as late events")
    read_wait_ms: float = setting(
        5.0, "how long an ingress replica waits for a shard on its node to answer a read before yielding "
             "its event loop (read_channel.py); 0: always yield")
    board_users: int = setting(
        65_536, "users per shard whose packed profile is kept in shared memory for the node's ingress "
                "replicas to score themselves (one packed state's size of the temp dir each); 0: every read goes "
                "to the shard")
    host: str = setting("127.0.0.1", "HTTP host of the service")
    port: int = setting(8000, "HTTP port of the service")
    token_env: str = setting("PROFILEREC_API_TOKEN", "environment variable holding the bearer token for writes")
    token_file: Optional[str] = setting(None, "... or the file holding it; none: <state_dir>/api_token")


@dataclass
class PipelineConfig:
    """jobs/pipeline.py (`profilerec demo`): every job in turn, then the live service.

    Input and output locations of the sections are derived from `work_dir`; the other settings
    of each section apply as in the job's own config.
    """

    work_dir: str = setting(DEFAULT_WORK_DIR, "folder of every stage's output, the service's state and the logs")
    prepare: PrepareConfig = setting(
        factory=lambda: PrepareConfig(sample_users=400, sample_items=True),
        help="the prepare stage (a few hundred real users and the items they touched: the workflow in minutes)")
    encode: EncodeConfig = setting(factory=EncodeConfig, help="the encode stage")
    finetune: FinetuneConfig = setting(factory=lambda: FinetuneConfig(epochs=1, max_steps_per_epoch=40),
                                       help="the encoder fine-tune (with run_finetune)")
    train: TrainConfig = setting(factory=TrainConfig, help="the scorer training stage")
    index: IndexConfig = setting(factory=IndexConfig, help="the nearest-neighbour index stage")
    evaluate: EvaluateConfig = setting(factory=EvaluateConfig, help="the evaluate stage")
    serve: ServeConfig = setting(factory=ServeConfig, help="the service")
    run_finetune: bool = setting(
        False, "fine-tune the encoder too (slow on a CPU; on Amazon it did not beat the untuned encoder)")
    run_service: bool = setting(True, "start the service and send the demo requests")
    keep_serving: bool = setting(False, "leave the service running (Ctrl-C stops it)")
    ray: RayConfig = setting(factory=RayConfig, help="how the job reaches Ray (every stage)")


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


@dataclass(frozen=True)
class SettingInfo:
    """One setting as `--help` shows it: dotted name, type, default and description."""

    name: str
    type: str
    default: Any
    help: str


def iter_settings(config: Any, prefix: str = "") -> typing.Iterator[SettingInfo]:
    """Every leaf setting of a config instance, sections flattened to dotted names, in field
    order; the defaults are the instance's values (a section's own defaults included)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_settings(value, f"{prefix}{f.name}.")
        else:
            yield SettingInfo(f"{prefix}{f.name}", type_name(hints[f.name]), value, setting_help(f))


def type_name(tp: Any) -> str:
    """How `--help` names a setting's type: INT, NUM, TEXT, BOOL, a list or mapping of them, `|none`
    when it may be left unset."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return type_name(inner[0]) + ("|none" if type(None) in args else "")
    if origin is list:
        return f"[{type_name(args[0])},...]"
    if origin is dict:
        return f"{{{type_name(args[0])}: {type_name(args[1])}}}"
    return {bool: "true|false", int: "INT", float: "NUM", str: "TEXT"}.get(tp, getattr(tp, "__name__", str(tp)))


def pop_settings(cls: type, argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `--name value` flags into those naming a field of `cls` and the rest (in order), so
    two configs can be read from one command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    mine: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        take = 1 if "=" in argv[i] or not argv[i].startswith("--") or i + 1 >= len(argv) else 2
        flag = argv[i : i + take]
        name = flag[0][2:].split("=", 1)[0].replace("-", "_") if flag[0].startswith("--") else None
        (mine if name in names else rest).extend(flag)
        i += take
    return mine, rest


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
        # `--max_cases none` as well as YAML's null: `--help` shows unset defaults as none
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
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
