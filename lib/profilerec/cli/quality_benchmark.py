"""The ablation table from scratch: prepare, encode, train every variant, evaluate valid and test.

Each row adds one part to the one above it, so the table shows what each part is worth:

    popularity                    the same most-popular list for everyone
    zero-shot profile             the untrained profile (cosine to the interest vectors)
    [+ fine-tuned encoder]        the same with the encoder fine-tuned (optional: slow on a CPU)
    learned projection            the scorer with only the newest item, through a learned projection
    + interest vectors            + the long- and short-term vectors
    + window attention            + attention over the recent window
    + repeat bonus                + learned bonus for items in the window
    + transitions                 + what users touched next, from the log
    + reverse transitions         + what users touched just before, from the log
    + popularity                  + item popularity
    + second stage (default)      + the network reordering the top 50: the default configuration
    + item ID embeddings          + per-item learned vectors (not in the default)

Valid figures are the chosen epoch of the scorer (trained on train), and with the second stage
its cross-fitted figure (fitted on some folds of valid, measured on the others); test figures are
the model the train job writes (the scorer of the chosen epoch, and the second stage fitted on all
of valid). The test split is only read here, to report. Published figures for the same data set
sit beside the table when known.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Optional

from profilerec.batch.encode import run_encode
from profilerec.batch.evaluate import report_chart, split_recommender
from profilerec.cli.console import progress, stage
from profilerec.config import BenchmarkConfig, ScorerConfig
from profilerec.data import storage
from profilerec.data.datasets import prepare, read_prepared
from profilerec.data.schema import TITLE_REPEATS
from profilerec.data.vectors import items_title_repeats
from profilerec.model.ranking import case_ranks, popularity_ranks, ranking_metrics
from profilerec.model.replay import iter_cases, user_sequences
from profilerec.runtime.cluster import cluster_gpus, init_ray
from profilerec.training.finetune import run_finetune
from profilerec.training.scorer import run_train

log = logging.getLogger(__name__)

# (row name, folder name, changes to the scorer config, whether the second stage is on from this
# row: None = as the row above), each row on top of the one before
ABLATION: list[tuple[str, str, dict[str, Any], Optional[bool]]] = [
    ("learned projection, newest item", "newest",
     {"interests": False, "attention": False, "repeat": False, "transitions": False, "reverse_transitions": False,
      "popularity": False}, False),
    ("+ interest vectors", "interests", {"interests": True}, None),
    ("+ window attention", "attention", {"attention": True}, None),
    ("+ repeat bonus", "repeat", {"repeat": True}, None),
    ("+ transitions", "transitions", {"transitions": True}, None),
    ("+ reverse transitions", "reverse", {"reverse_transitions": True}, None),
    ("+ popularity", "popularity", {"popularity": True}, None),
    ("+ second stage (default)", "default", {}, True),
    ("+ item ID embeddings", "ids", {"id_embeddings": True}, None),
]

# MiniOneRec paper (arXiv 2510.24431), test split of Amazon 2018 Industrial and Scientific
PUBLISHED = {
    "amazon-industrial": [
        ("GRU4Rec", [0.0638, 0.0542, 0.0774, 0.0598, 0.0999, 0.0669]),
        ("SASRec", [0.0790, 0.0700, 0.0909, 0.0748, 0.1088, 0.0806]),
        ("TIGER", [0.0852, 0.0742, 0.1010, 0.0807, 0.1321, 0.0908]),
        ("BIGRec (LLM)", [0.0931, 0.0841, 0.1092, 0.0907, 0.1370, 0.0997]),
        ("D3 (LLM)", [0.1024, 0.0991, 0.1213, 0.0989, 0.1500, 0.1082]),
        ("S-DPO (LLM)", [0.1032, 0.0906, 0.1238, 0.0991, 0.1524, 0.1082]),
        ("MiniOneRec (Qwen2.5 1.5B, SFT+RL)", [0.1143, 0.1011, 0.1321, 0.1084, 0.1586, 0.1167]),
    ],
}
PUBLISHED_COLUMNS = ["HR@3", "NDCG@3", "HR@5", "NDCG@5", "HR@10", "NDCG@10"]


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Every stage from the source files to the ablation report under `<work_dir>/report`."""

    started = time.perf_counter()
    work = storage.absolute(cfg.work_dir)
    prepared, base = storage.join(work, "prepared"), storage.join(work, "embeddings", "base")
    with stage("start Ray"):
        init_ray(cfg.ray)
        use_gpu = cluster_gpus() > 0
    if not storage.exists(storage.join(prepared, "manifest.json")):
        with stage("prepare"):
            prepare(dataclasses.replace(cfg.prepare, output=prepared))
    # the encode job's cache makes a rerun cheap; skipped only when the items' text form is today's
    if not storage.exists(storage.join(base, "manifest.json")) or items_title_repeats(base) != TITLE_REPEATS:
        with stage("encode"):
            run_encode(dataclasses.replace(cfg.encode, input=prepared, output=base, ray=cfg.ray), use_gpu, progress)
    data = read_prepared(prepared)
    sequences = user_sequences(data.events)
    cases = {split: list(iter_cases(sequences, data.cases, [split], data.max_history)) for split in ("valid", "test")}
    rows: list[dict[str, Any]] = []

    def measure(name: str, embeddings: str, model: Optional[str] = None) -> None:
        row: dict[str, Any] = {"name": name}
        for split, split_cases in cases.items():
            recommender = split_recommender(data, sequences, embeddings, split, model)
            ranks = popularity_ranks(recommender, split_cases) if name == "popularity" else case_ranks(recommender, split_cases)
            row[split] = ranking_metrics(ranks, cfg.ks)
        rows.append(row)
        log.info("%s: valid %s, test %s", name, row["valid"], row["test"])

    with stage("baselines"):
        measure("popularity", base)
        measure("zero-shot profile", base)
    embeddings = base
    if cfg.finetune_encoder:
        model = storage.join(work, "finetuned")
        embeddings = storage.join(work, "embeddings", "finetuned")
        with stage("fine-tune"):
            run_finetune(dataclasses.replace(cfg.finetune, input=prepared, output=model, ray=cfg.ray), progress)
        with stage("encode (fine-tuned)"):
            run_encode(dataclasses.replace(cfg.encode, input=prepared, output=embeddings,
                                           model=storage.join(model, "encoder"), ray=cfg.ray), use_gpu, progress)
            measure("+ fine-tuned encoder", embeddings)
    scorer = dataclasses.asdict(cfg.train.scorer)
    second_stage = cfg.train.second_stage
    variants = ABLATION if cfg.ablation else [("profilerec (default)", "default", {}, True)]
    for name, folder, change, staged in variants:
        scorer.update(change)
        if staged is not None:
            second_stage = cfg.train.second_stage if staged else dataclasses.replace(second_stage, depth=0)
        output = storage.join(work, "models", folder)
        train = dataclasses.replace(cfg.train, input=prepared, embeddings=embeddings, output=output, ray=cfg.ray,
                                    scorer=ScorerConfig(**scorer), second_stage=second_stage)
        with stage(f"train + evaluate: {name}"):
            manifest = run_train(train, progress)
            evaluate = split_recommender(data, sequences, embeddings, "test", output)
            rows.append({"name": name, "valid": manifest["validation"],
                         "test": ranking_metrics(case_ranks(evaluate, cases["test"]), cfg.ks),
                         "train_seconds": manifest["seconds"], "best_epoch": manifest["best_epoch"]})
        log.info("%s: valid %s, test %s", name, rows[-1]["valid"], rows[-1]["test"])

    report = {"input": cfg.prepare.input, "items": data.items.num_rows,
              "cases": {split: len(c) for split, c in cases.items()}, "rows": rows,
              "published": PUBLISHED.get(os.path.basename(os.path.normpath(cfg.prepare.input)), []),
              "seconds": round(time.perf_counter() - started, 1)}
    write_ablation(report, storage.join(work, "report"))
    return report


def write_ablation(report: dict[str, Any], output: str) -> None:
    """ablation.json, ablation.md and ablation.png (test figures per row) under `output`."""

    storage.write_json(report, storage.join(output, "ablation.json"))
    storage.write_bytes(ablation_markdown(report).encode(), storage.join(output, "ablation.md"))
    chart = {"split": "test", "cases": report["cases"]["test"], "items": report["items"],
             "methods": {row["name"]: row["test"] for row in report["rows"]}}
    storage.write_bytes(report_chart(chart), storage.join(output, "ablation.png"))


def ablation_markdown(report: dict[str, Any]) -> str:
    """The ablation as Markdown: one table for valid and test side by side, then the published one."""
    columns = [c for c in report["rows"][0]["test"] if c != "MRR"]
    lines = [f"# Ablation: {report['input']}", "",
             f"Full ranking of {report['items']} items; valid {report['cases']['valid']} cases, "
             f"test {report['cases']['test']} cases. Each row adds one part to the row above.", "",
             "| method | " + " | ".join(f"valid {c}" for c in columns) + " | " + " | ".join(f"test {c}" for c in columns) + " |",
             "| --- |" + " --- |" * (2 * len(columns))]
    for row in report["rows"]:
        cells = [f"{row['valid'].get(c, float('nan')):.4f}" for c in columns] + [f"{row['test'][c]:.4f}" for c in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if report["published"]:
        lines += ["", "Published test figures (MiniOneRec paper, same split, trained on the full train split):", "",
                  "| method | " + " | ".join(PUBLISHED_COLUMNS) + " |", "| --- |" + " --- |" * len(PUBLISHED_COLUMNS)]
        for name, values in report["published"]:
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    lines += ["", f"Wall time of the whole run: {report['seconds']} s."]
    return "\n".join(lines) + "\n"
