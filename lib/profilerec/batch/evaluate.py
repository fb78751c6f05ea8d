"""Replay evaluation: full-ranking HR/NDCG@K and MRR of profilerec and baselines, and the report.

For every case of the chosen split the profile is rebuilt from the case's history with
profile.py (exactly as the service would hold it), all items are scored, and the rank of the
target is recorded. Nothing is removed from the ranking (repeat consumption is a real target).
When the index job's output is there, a "(two-stage)" line ranks the same cases as a service
with two-stage retrieval answers them (its top 100; MRR counts a target below them as missed).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from profilerec.config import EvaluateConfig
from profilerec.data import storage
from profilerec.data.datasets import iter_user_events, read_prepared
from profilerec.errors import ConfigError, DataError
from profilerec.model.ann import index_exists
from profilerec.model.priors import ItemPriors, item_priors, log_priors
from profilerec.model.profile import ProfileParams
from profilerec.model.ranking import case_ranks, popularity_ranks, ranking_metrics, two_stage_ranks
from profilerec.model.recommend import Recommender, load_profile_params, load_recommender
from profilerec.model.replay import Case, hidden_event_ids, iter_cases, later_splits, user_sequences
from profilerec.runtime.parallel import default_workers, map_chunks, worker_state

if TYPE_CHECKING:  # only the type: evaluating needs no Ray
    from profilerec.runtime.cluster import ProgressFn

log = logging.getLogger(__name__)


def split_recommender(data, sequences: Optional[dict], embeddings: str, split: str, model: Optional[str] = None,
                      params: Optional[ProfileParams] = None, prepared: Optional[str] = None) -> Recommender:
    """A Recommender (with the scorer saved in `model`, if any) whose item priors ignore the
    targets of `split` and later splits. A scorer trained on targets of `split` is refused.
    The priors are counted over `sequences`, or, when `prepared` (the prepared folder of `data`)
    is given, streamed from its events (then `sequences` may be None)."""
    recommender = load_recommender(data.items, embeddings, params, model=model)
    if recommender.scorer is not None:
        seen = set(recommender.scorer.trained_on) & set(later_splits(split))
        if seen:
            raise ConfigError(f"the scorer in {model} was trained on the targets of {sorted(seen)}: evaluating it "
                              f"on {split!r} would be meaningless (evaluate a later split, or train with --refit false "
                              f"--second_stage.depth 0)")
    if prepared is not None:
        mask = pc.is_in(data.cases.column("split"), pa.array(later_splits(split)))
        hidden = data.cases.filter(mask).column("target_event_id").combine_chunks()
        priors = log_priors(prepared, recommender.index, hidden, recommender.transition_span)
    else:
        priors = item_priors(sequences, recommender.index, hidden_event_ids(data.cases, split),
                             recommender.transition_span)
    recommender.set_priors(priors)
    return recommender


@dataclass
class MethodResult:
    """One line of the report."""

    name: str
    metrics: dict[str, float]
    seconds: float


def run_evaluate(cfg: EvaluateConfig, progress: Optional[ProgressFn] = None) -> dict[str, Any]:
    """The evaluate job: score every case of `cfg.split`, compare with baselines, write the report.

    The log streams through in chunks of whole users (datasets.iter_user_events): once to count
    the item priors, once to replay the cases, chunk by chunk on `cfg.workers` processes, so
    memory holds a few chunks, not the whole log. `progress(what, done, total)` hears of the
    cases scored.
    """

    data = read_prepared(cfg.input, events=False)
    split_cases = data.cases.filter(pc.equal(data.cases.column("split"), cfg.split))
    if cfg.max_cases:
        split_cases = split_cases.slice(0, cfg.max_cases)
    if not split_cases.num_rows:
        raise ConfigError(f"setting split: split {cfg.split!r} of {cfg.input} has no cases")
    workers = default_workers(cfg.workers)
    log.info("evaluating %d %s cases of %s on %d process(es)", split_cases.num_rows, cfg.split, cfg.input, workers)

    params = load_profile_params(cfg.model)
    model = split_recommender(data, None, cfg.embeddings, cfg.split, cfg.model, params, prepared=cfg.input)
    base_priors = None
    if cfg.baselines and cfg.baseline_embeddings and storage.exists(storage.join(cfg.baseline_embeddings, "items")):
        base_priors = split_recommender(data, None, cfg.baseline_embeddings, cfg.split, None, params,
                                        prepared=cfg.input).priors

    def chunk_cases() -> Iterator[tuple[pa.Table, pa.Table]]:
        # the cases are in log order, so each chunk of whole users owns the next run of cases
        case_users = split_cases.column("user_id").to_numpy(zero_copy_only=False)
        done = 0
        for chunk in iter_user_events(cfg.input):
            end = int(np.searchsorted(case_users, chunk.column("user_id")[-1].as_py(), side="right"))
            if end > done:
                yield chunk, split_cases.slice(done, end - done)
                done = end
            if done == len(case_users):
                return
        raise DataError(f"{len(case_users) - done} {cfg.split} cases of {cfg.input} belong to users with no "
                         f"events (or the log is not sorted by user): prepare the data again")

    ranks: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    scored = 0
    if progress is not None:
        progress(f"{cfg.split} cases scored", scored, split_cases.num_rows)
    for result in map_chunks(_chunk_ranks, chunk_cases(), workers, _load_methods,
                             (cfg, params, data.items, data.max_history, model.priors, base_priors)):
        for name, (part, spent) in result.items():
            ranks.setdefault(name, []).append(part)
            seconds[name] = seconds.get(name, 0.0) + spent
        scored += len(next(iter(result.values()))[0])  # every method scores the same cases
        if progress is not None:
            progress(f"{cfg.split} cases scored", scored, split_cases.num_rows)
    results = []
    for name, parts in ranks.items():
        results.append(MethodResult(name, ranking_metrics(np.concatenate(parts), cfg.ks), round(seconds[name], 2)))
        log.info("%s: %s", name, _fmt(results[-1].metrics))

    report = {
        "input": cfg.input,
        "split": cfg.split,
        "cases": split_cases.num_rows,
        "items": len(model.index),
        "methods": {r.name: r.metrics for r in results},
        "seconds": {r.name: r.seconds for r in results},
    }
    write_report(report, cfg.output)
    return report


def _load_methods(cfg: EvaluateConfig, params: ProfileParams, items: pa.Table, max_history: Optional[int],
                  priors: ItemPriors, base_priors: Optional[ItemPriors]) -> None:
    """Worker set-up of run_evaluate: the recommender of each method, with the priors counted once."""
    model = load_recommender(items, cfg.embeddings, params, model=cfg.model)
    model.set_priors(priors)
    methods: list[tuple[str, Callable[[Sequence[Case]], np.ndarray]]] = []
    if cfg.baselines:
        methods.append(("popularity", lambda c: popularity_ranks(model, c)))
        if base_priors is not None:
            base = load_recommender(items, cfg.baseline_embeddings, params)
            base.set_priors(base_priors)
            methods.append(("zero-shot profile, base encoder", lambda c: case_ranks(base, c)))
        if model.scorer is not None:
            plain = replace(model, scorer=None)  # same index, vectors and priors
            methods.append(("zero-shot profile", lambda c: case_ranks(plain, c)))
    methods.append((cfg.method_name, lambda c: case_ranks(model, c)))
    if cfg.two_stage and index_exists(cfg.retrieval.index):
        two_stage = replace(model)  # same index, vectors, priors and scorer
        two_stage.use_retrieval(replace(cfg.retrieval, mode="two_stage"))
        methods.append((f"{cfg.method_name} (two-stage)", lambda c: two_stage_ranks(two_stage, c)))
    worker_state().update(methods=methods, split=cfg.split, max_history=max_history)


def _chunk_ranks(work: tuple[pa.Table, pa.Table]) -> dict[str, tuple[np.ndarray, float]]:
    """Ranks (and seconds spent) of every method on the cases of one chunk of whole users."""
    events, cases_table = work
    state = worker_state()
    cases = list(iter_cases(user_sequences(events), cases_table, [state["split"]], state["max_history"]))
    out = {}
    for name, ranking in state["methods"]:
        started = time.perf_counter()
        out[name] = (ranking(cases), time.perf_counter() - started)
    return out


def write_report(report: dict[str, Any], output: str) -> None:
    """report.json, report.md and report.png (HR/NDCG@K per method) under `output`."""
    storage.write_json(report, storage.join(output, "report.json"))
    storage.write_bytes(report_markdown(report).encode(), storage.join(output, "report.md"))
    storage.write_bytes(report_chart(report), storage.join(output, "report.png"))


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: one table row per method."""
    methods = report["methods"]
    columns = list(next(iter(methods.values())).keys())
    lines = [
        f"# Evaluation: {report['split']} split of {report['input']}",
        "",
        f"{report['cases']} cases, full ranking of {report['items']} items, one target per case.",
        "",
        "| method | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for name, metrics in methods.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def report_chart(report: dict[str, Any]) -> bytes:
    """A PNG bar chart of every HR@K and NDCG@K per method."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    columns = [c for c in next(iter(methods.values())) if c != "MRR"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(columns) * len(methods) / 2), 4))
    width = 0.8 / len(methods)
    x = np.arange(len(columns))
    for i, (name, metrics) in enumerate(methods.items()):
        ax.bar(x + i * width, [metrics[c] for c in columns], width, label=name)
    ax.set_xticks(x + width * (len(methods) - 1) / 2, columns)
    ax.set_ylabel("score")
    ax.set_title(f"{report['split']} split, {report['cases']} cases, {report['items']} items")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
