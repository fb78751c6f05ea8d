"""One function per job: read its config from flags/YAML, run it, print what it did.

The `profilerec` command (cli.py) and the thin scripts in jobs/ both call these, so
`profilerec encode ...` and `python jobs/encode.py ...` are the same thing.
"""

from __future__ import annotations

import json
from typing import Optional

from profilerec.config import (
    BenchmarkConfig,
    EncodeConfig,
    EvaluateConfig,
    FinetuneConfig,
    PipelineConfig,
    PrepareConfig,
    ProfilesConfig,
    TrainConfig,
    load_config,
)


def prepare(argv: Optional[list[str]] = None) -> None:
    """Source files -> canonical Parquet (events, items, cases)."""
    from profilerec.data.datasets import prepare as prepare_data

    cfg = load_config(PrepareConfig, argv)
    data = prepare_data(cfg)
    print(f"wrote {data.events.num_rows} events, {data.items.num_rows} items, {data.cases.num_rows} cases "
          f"to {cfg.output}; {data.invalid.summary()}")


def encode(argv: Optional[list[str]] = None) -> None:
    """Item and event texts -> embeddings, on a Ray Data actor pool."""
    from profilerec.batch.encode import run_encode
    from profilerec.runtime.cluster import cluster_gpus, init_ray

    cfg = load_config(EncodeConfig, argv)
    init_ray(cfg.ray)
    manifest = run_encode(cfg, use_gpu=cluster_gpus() > 0)
    print(f"wrote {manifest['counts']} vectors (dim {manifest['dim']}) to {cfg.output} in {manifest['seconds']} s")


def finetune(argv: Optional[list[str]] = None) -> None:
    """Fine-tune the encoder with Ray Train; the best epoch's model goes to the output folder."""
    from profilerec.training.finetune import run_finetune

    cfg = load_config(FinetuneConfig, argv)
    manifest = run_finetune(cfg)
    print(f"best epoch {manifest['best_epoch']} ({json.dumps(manifest['metrics'])}); model in {cfg.output}")


def train(argv: Optional[list[str]] = None) -> None:
    """Fit the profile scorer with Ray Train; it goes to <output>/scorer."""
    from profilerec.training.scorer import run_train

    cfg = load_config(TrainConfig, argv)
    manifest = run_train(cfg)
    valid = ", ".join(f"{k} {v:.4f}" for k, v in manifest["validation"].items())
    refit = f", then refit on {cfg.train_splits + [cfg.eval_split]}" if cfg.refit else ""
    print(f"best epoch {manifest['best_epoch']} on {cfg.eval_split} ({valid}){refit}; "
          f"scorer in {cfg.output}/scorer ({manifest['seconds']} s)")


def profiles(argv: Optional[list[str]] = None) -> None:
    """Every user's profile from the whole log, plus the popularity prior."""
    from profilerec.batch.profiles import run_profiles

    summary = run_profiles(load_config(ProfilesConfig, argv))
    print(f"built {summary['users']} profiles from {summary['events']} events in {summary['seconds']} s "
          f"-> {summary['output']}")


def evaluate(argv: Optional[list[str]] = None) -> None:
    """Full-ranking evaluation with baselines; report as JSON, Markdown and PNG."""
    from profilerec.batch.evaluate import report_markdown, run_evaluate

    cfg = load_config(EvaluateConfig, argv)
    report = run_evaluate(cfg)
    print(report_markdown(report))
    print(f"report written to {cfg.output}")


def benchmark(argv: Optional[list[str]] = None) -> None:
    """The ablation table from scratch: every variant trained and evaluated on valid and test."""
    from profilerec.cli.quality_benchmark import ablation_markdown, run_benchmark

    cfg = load_config(BenchmarkConfig, argv)
    report = run_benchmark(cfg)
    print(ablation_markdown(report))
    print(f"report written to {cfg.work_dir}/report")


def pipeline(argv: Optional[list[str]] = None) -> None:
    """The whole workflow on one work folder, then the live service answering demo requests."""
    from profilerec.cli.pipeline import run_pipeline

    run_pipeline(load_config(PipelineConfig, argv))


COMMANDS = {
    "demo": pipeline,
    "pipeline": pipeline,
    "prepare": prepare,
    "encode": encode,
    "finetune": finetune,
    "train": train,
    "profiles": profiles,
    "evaluate": evaluate,
    "benchmark": benchmark,
}
