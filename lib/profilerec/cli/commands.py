"""The jobs: for each, its config dataclass, the checks that run before it starts Ray, and the
function that runs it and tells what it did.

The `profilerec` command (cli/main.py) and the thin scripts in jobs/ both run these through
run_job, so `profilerec encode ...` and `python jobs/encode.py ...` are the same thing.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from profilerec.cli import checks, summaries
from profilerec.cli.console import job_console, progress, run_guarded, say, stage, summary
from profilerec.cli.help import job_help, print_help
from profilerec.config import (
    DEFAULT_WORK_DIR,
    BenchmarkConfig,
    ConsoleConfig,
    EncodeConfig,
    EvaluateConfig,
    FinetuneConfig,
    IndexConfig,
    PipelineConfig,
    PrepareConfig,
    ProfilesConfig,
    TrainConfig,
    iter_settings,
    load_config,
    pop_settings,
)
from profilerec.data import storage
from profilerec.errors import ConfigError

HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class Job:
    """One `profilerec` command."""

    name: str
    config: type
    run: Callable[[Any], None]
    check: Callable[[Any], None]
    # settings a workflow sets itself from its work_dir: not in --help, refused
    derived: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """The first line of the run function's docstring."""
        return (self.run.__doc__ or "").strip().splitlines()[0]


# --------------------------------------------------------------------------------------------
# Running a job


def run_job(job: "Job | str", argv: Optional[list[str]] = None) -> None:
    """Run one job from its command line: `--help` prints its settings; settings are read and
    checked before anything starts (errors: one line, exit code 2); then the job runs with the
    quiet console and ends with its summary."""
    job = JOBS[job] if isinstance(job, str) else job
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(flag in HELP_FLAGS for flag in argv):
        print_help(job_help(job.name, job.config(), job.summary, job.derived, ConsoleConfig()))
        return
    cfg, console_cfg = run_guarded(lambda: read_settings(job, argv))
    folder = console_cfg.log_dir or log_folder(cfg)
    with job_console(job.name, folder, console_cfg.verbose):
        run_guarded(lambda: _run_then_stop_ray(job, cfg))


def read_settings(job: Job, argv: list[str]) -> tuple[Any, ConsoleConfig]:
    """The job's config and the console settings from one command line, checked."""
    console_argv, job_argv = pop_settings(ConsoleConfig, argv)
    console_cfg = load_config(ConsoleConfig, console_argv)
    cfg = load_config(job.config, job_argv)
    refuse_derived(job, cfg)
    if getattr(cfg, "ray", None) is not None and cfg.ray.address:
        from profilerec.runtime.cluster import check_reachable

        check_reachable(cfg.ray.address)
    job.check(cfg)
    return cfg, console_cfg


def refuse_derived(job: Job, cfg: Any) -> None:
    """A workflow sets some sections' locations from its work_dir: setting them is an error (it
    would be ignored), found as a value that differs from the default."""
    if not job.derived:
        return
    defaults = {s.name: s.default for s in iter_settings(job.config())}
    for s in iter_settings(cfg):
        if s.name in job.derived and s.default != defaults[s.name]:
            raise ConfigError(f"setting {s.name} cannot be set for {job.name}: it is derived from work_dir "
                              f"(and the top-level ray section)")


def log_folder(cfg: Any) -> str:
    """Where the job's log file goes: `<work_dir>/logs`, else `logs` beside the job's output (the
    work folder, with the default locations); `work/logs` when the output is a URI."""
    work = getattr(cfg, "work_dir", None)
    if work is None:
        output = getattr(cfg, "output", DEFAULT_WORK_DIR)
        work = DEFAULT_WORK_DIR if storage.is_uri(output) else os.path.dirname(os.path.normpath(output)) or "."
    return os.path.join(work, "logs")


def _run_then_stop_ray(job: Job, cfg: Any) -> None:
    # Ray is stopped while its output still goes to the log file: at interpreter exit it would
    # print its shutdown to the terminal
    try:
        job.run(cfg)
        summary()
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()


# --------------------------------------------------------------------------------------------
# The jobs


def prepare(cfg: PrepareConfig) -> None:
    """Source files -> canonical Parquet (events, items, cases)."""
    from profilerec.data.datasets import describe
    from profilerec.data.datasets import prepare as prepare_data

    with stage("prepare"):
        data = prepare_data(cfg)
    say(describe(data, cfg.output))


def encode(cfg: EncodeConfig) -> None:
    """Item and event texts -> embeddings, on a Ray Data actor pool."""
    from profilerec.batch.encode import run_encode
    from profilerec.runtime.cluster import cluster_gpus, init_ray

    with stage("start Ray"):
        init_ray(cfg.ray)
    with stage("encode"):
        manifest = run_encode(cfg, use_gpu=cluster_gpus() > 0, progress=progress)
    say(summaries.encoded(manifest, cfg.output))


def finetune(cfg: FinetuneConfig) -> None:
    """Fine-tune the encoder with Ray Train; the best epoch's model goes to the output folder."""
    from profilerec.runtime.cluster import init_ray
    from profilerec.training.finetune import run_finetune

    with stage("start Ray"):
        init_ray(cfg.ray)
    with stage("fine-tune"):
        manifest = run_finetune(cfg, progress=progress)
    say(summaries.finetuned(manifest, cfg.output))


def train(cfg: TrainConfig) -> None:
    """Fit the profile scorer (the recommendation model) with Ray Train; it goes to <output>/scorer."""
    from profilerec.runtime.cluster import init_ray
    from profilerec.training.scorer import run_train

    with stage("start Ray"):
        init_ray(cfg.ray)
    with stage("train profile scorer"):
        manifest = run_train(cfg, progress=progress)
    say(summaries.trained(manifest, cfg))


def index(cfg: IndexConfig) -> None:
    """The nearest-neighbour index two-stage recommendations take their candidates from."""
    from profilerec.batch.index import run_index

    with stage("index"):
        manifest = run_index(cfg)
    say(summaries.indexed(manifest, cfg.output))


def profiles(cfg: ProfilesConfig) -> None:
    """Every user's profile from the whole log, plus the popularity prior."""
    from profilerec.batch.profiles import run_profiles

    with stage("profiles"):
        result = run_profiles(cfg)
    say(f"built {result['users']} profiles from {result['events']} events -> {result['output']}")


def evaluate(cfg: EvaluateConfig) -> None:
    """Full-ranking evaluation with baselines; report as JSON, Markdown and PNG."""
    from profilerec.batch.evaluate import report_markdown, run_evaluate

    with stage("evaluate"):
        report = run_evaluate(cfg, progress=progress)
    say("\n" + report_markdown(report))
    say(f"report written to {cfg.output}")


def benchmark(cfg: BenchmarkConfig) -> None:
    """The ablation table from scratch: every variant trained and evaluated on valid and test."""
    from profilerec.cli.quality_benchmark import ablation_markdown, run_benchmark

    report = run_benchmark(cfg)
    say("\n" + ablation_markdown(report))
    say(f"report written to {cfg.work_dir}/report")


def pipeline(cfg: PipelineConfig) -> None:
    """The whole workflow on the bundled sample (prepare, encode, train, index, profiles, evaluate), then the
    live service."""
    from profilerec.cli.pipeline import run_pipeline

    run_pipeline(cfg)


# --------------------------------------------------------------------------------------------
# What each job checks before it starts


def check_prepare(cfg: PrepareConfig) -> None:
    """The source format is known and its input is there."""
    from profilerec.data.datasets import SOURCES

    if cfg.source not in SOURCES:
        raise ConfigError(f"setting source: unknown source {cfg.source!r}; known sources: {', '.join(SOURCES)}")
    checks.check_folder(cfg.input, "input", "input folder or file")
    checks.check_positive(cfg.sample_users, "sample_users")


def check_encode(cfg: EncodeConfig, prefix: str = "", prepared: bool = True) -> None:
    """The prepared data (unless a workflow makes it first), the text model and the precision."""
    checks.check_precision(cfg.precision, f"{prefix}precision")
    checks.check_positive(cfg.num_actors, f"{prefix}num_actors")
    checks.check_text_model(cfg.model, f"{prefix}model")
    if prepared:
        checks.check_prepared(cfg.input, f"{prefix}input")


def _check_ray_train(cfg: FinetuneConfig | TrainConfig, prefix: str) -> None:
    """What the two Ray Train jobs share: their splits and their number of workers."""
    checks.check_splits(cfg.train_splits, f"{prefix}train_splits")
    checks.check_splits([cfg.eval_split], f"{prefix}eval_split")
    checks.check_positive(cfg.num_workers, f"{prefix}num_workers")


def check_finetune(cfg: FinetuneConfig, prefix: str = "", prepared: bool = True) -> None:
    """The prepared data, the model to start from and the splits."""
    _check_ray_train(cfg, prefix)
    checks.check_text_model(cfg.model, f"{prefix}model")
    if prepared:
        checks.check_prepared(cfg.input, f"{prefix}input")


def check_train(cfg: TrainConfig, prefix: str = "", inputs: bool = True) -> None:
    """The prepared data and embeddings (unless a workflow makes them first) and the splits."""
    from profilerec.training.losses import LOSSES

    _check_ray_train(cfg, prefix)
    checks.check_positive(cfg.epochs, f"{prefix}epochs")
    if cfg.loss not in LOSSES:
        raise ConfigError(f"setting {prefix}loss: {cfg.loss!r} is not a loss; choose one of {', '.join(LOSSES)}")
    checks.check_positive(cfg.negatives, f"{prefix}negatives")
    if inputs:
        checks.check_prepared(cfg.input, f"{prefix}input")
        checks.check_embeddings(cfg.embeddings, f"{prefix}embeddings")


def check_index(cfg: IndexConfig, prefix: str = "", inputs: bool = True) -> None:
    """The prepared data, embeddings and model folder (unless a workflow makes them), the index's sizes."""
    for name in ("lists", "probes", "recall_queries", "threads"):
        checks.check_positive(getattr(cfg, name), f"{prefix}{name}")
    if not 0 < cfg.target_recall <= 1:
        raise ConfigError(f"setting {prefix}target_recall must be in (0, 1], got {cfg.target_recall}")
    if inputs:
        checks.check_prepared(cfg.input, f"{prefix}input")
        checks.check_embeddings(cfg.embeddings, f"{prefix}embeddings")
        checks.check_folder(cfg.model, f"{prefix}model", "model folder")


def check_profiles(cfg: ProfilesConfig) -> None:
    """The prepared data, embeddings and model folder."""
    checks.check_prepared(cfg.input, "input")
    checks.check_embeddings(cfg.embeddings, "embeddings")
    checks.check_folder(cfg.model, "model", "model folder")


def check_evaluate(cfg: EvaluateConfig, prefix: str = "", inputs: bool = True) -> None:
    """The prepared data, embeddings and model folder (unless a workflow makes them) and the split."""
    from profilerec.model.retrieval import check_retrieval

    checks.check_splits([cfg.split], f"{prefix}split")
    checks.check_positive(cfg.max_cases, f"{prefix}max_cases")
    check_retrieval(cfg.retrieval, f"{prefix}retrieval.")
    if inputs:
        checks.check_prepared(cfg.input, f"{prefix}input")
        checks.check_embeddings(cfg.embeddings, f"{prefix}embeddings")
        checks.check_folder(cfg.model, f"{prefix}model", "model folder")
        if cfg.baseline_embeddings:
            checks.check_embeddings(cfg.baseline_embeddings, f"{prefix}baseline_embeddings")


def check_pipeline(cfg: PipelineConfig) -> None:
    """Every section the demo runs; the service's port is free."""
    check_prepare(cfg.prepare)
    check_encode(cfg.encode, "encode.", prepared=False)
    if cfg.run_finetune:
        check_finetune(cfg.finetune, "finetune.", prepared=False)
    check_train(cfg.train, "train.", inputs=False)
    check_index(cfg.index, "index.", inputs=False)
    check_evaluate(cfg.evaluate, "evaluate.", inputs=False)
    if cfg.run_service:
        from profilerec.model.retrieval import check_retrieval

        check_retrieval(cfg.serve.retrieval, "serve.retrieval.")
        checks.check_port_free(cfg.serve.host, cfg.serve.port, "serve.port")


def check_benchmark(cfg: BenchmarkConfig) -> None:
    """Every section the benchmark runs (the source only when nothing is prepared yet)."""
    if not storage.exists(storage.join(cfg.work_dir, "prepared", "manifest.json")):
        check_prepare(cfg.prepare)
    check_encode(cfg.encode, "encode.", prepared=False)
    if cfg.finetune_encoder:
        check_finetune(cfg.finetune, "finetune.", prepared=False)
    check_train(cfg.train, "train.", inputs=False)


# the sections' locations and Ray settings, which the workflows set from work_dir and `ray`
WORKFLOW_DERIVED = ("prepare.output", "*.input", "*.output", "*.embeddings", "*.model", "*.baseline_embeddings",
                    "serve.prepared", "serve.profiles", "serve.state_dir", "*.retrieval.index", "*.ray.*")
# the source, and the text models to start from, are the user's to choose
WORKFLOW_DERIVED_EXCEPT = ("prepare.input", "encode.model", "finetune.model")


def _workflow_derived(config: type) -> tuple[str, ...]:
    """The WORKFLOW_DERIVED settings that `config` has, as exact names."""
    names = [s.name for s in iter_settings(config()) if "." in s.name]
    return tuple(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in WORKFLOW_DERIVED)
                 and n not in WORKFLOW_DERIVED_EXCEPT)


JOBS: dict[str, Job] = {job.name: job for job in [
    Job("demo", PipelineConfig, pipeline, check_pipeline, _workflow_derived(PipelineConfig)),
    Job("pipeline", PipelineConfig, pipeline, check_pipeline, _workflow_derived(PipelineConfig)),
    Job("prepare", PrepareConfig, prepare, check_prepare),
    Job("encode", EncodeConfig, encode, check_encode),
    Job("finetune", FinetuneConfig, finetune, check_finetune),
    Job("train", TrainConfig, train, check_train),
    Job("index", IndexConfig, index, check_index),
    Job("profiles", ProfilesConfig, profiles, check_profiles),
    Job("evaluate", EvaluateConfig, evaluate, check_evaluate),
    Job("benchmark", BenchmarkConfig, benchmark, check_benchmark, _workflow_derived(BenchmarkConfig)),
]}
