"""The lines a job's results read as on the terminal, shared by the jobs and the workflows."""

from __future__ import annotations

from typing import Any

from profilerec.config import TrainConfig

HEADLINE_METRICS = ("HR@10", "NDCG@10")


def trained(manifest: dict[str, Any], cfg: TrainConfig) -> str:
    """The chosen epoch and the headline validation metrics of what is served (the manifest has
    them all), the second stage or the refit, where the scorer is."""
    valid = ", ".join(f"{k} {v:.4f}" for k, v in manifest["validation"].items() if k in HEADLINE_METRICS)
    stage = manifest.get("second_stage") or {}
    if "cross_fitted" in stage:
        after = f"; second stage fitted on {stage['fit_cases']:,} {cfg.eval_split} cases (figures cross-fitted)"
    elif "skipped" in stage:
        after = f"; no second stage: {stage['skipped']}"
    else:
        after = f"; refit on {'+'.join(cfg.train_splits + [cfg.eval_split])}" if cfg.refit else ""
    return f"best epoch {manifest['best_epoch']} on {cfg.eval_split} ({valid}){after}; scorer in {cfg.output}/scorer"


def encoded(manifest: dict[str, Any], output: str) -> str:
    """How many vectors were written where, and how many texts had to be encoded."""
    counts = manifest["counts"]
    events = f" + {counts['texts']:,} event text" if counts.get("texts") else ""
    cached = manifest["distinct_texts"] - manifest["encoded"]
    return (f"{counts['items']:,} item{events} vectors ({manifest['precision']}) in {output}: "
            f"{manifest['encoded']:,} texts encoded, {cached:,} from the cache")


def finetuned(manifest: dict[str, Any], output: str) -> str:
    """The best epoch and its validation metrics, where the encoder is."""
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in manifest["metrics"].items() if k.startswith("val_"))
    return f"best epoch {manifest['best_epoch']} ({metrics}); encoder in {output}/encoder"


def indexed(manifest: dict[str, Any], output: str) -> str:
    """What the index holds, how long it took, its measured recall, where it is."""
    return (f"IVF index over {manifest['items']:,} {manifest['vectors']} vectors in {manifest['build_seconds']:.1f} s: "
            f"{manifest['probes']} of {manifest['lists']} clusters scanned, recall@10 {manifest['recall@10']:.3f}, "
            f"recall@100 {manifest['recall@100']:.3f} -> {output}")
