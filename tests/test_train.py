"""The Ray Train scorer job on a tiny real work folder (trained once by the tiny_work fixture)."""

import json
import shutil

import numpy as np
import pytest
from profilerec.batch.evaluate import run_evaluate
from profilerec.config import EvaluateConfig, RetrievalConfig, SecondStageConfig, TrainConfig, from_dict
from profilerec.data import storage
from profilerec.data.datasets import read_prepared
from profilerec.data.schema import TITLE_REPEATS
from profilerec.data.vectors import items_title_repeats
from profilerec.errors import ConfigError
from profilerec.model.profile import ProfileState
from profilerec.model.recommend import load_recommender
from profilerec.model.replay import case_states, iter_cases, user_sequences
from profilerec.model.second_stage import SECOND_STAGE_FILE
from profilerec.training.scorer import run_train

# every test runs Ray jobs: on the tiny_work folder, or a benchmark run of its own
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _manifest(work):
    return json.loads((work / "model" / "scorer" / "manifest.json").read_text())


def test_training_lowers_the_loss_then_fits_the_second_stage_on_validation(tiny_work):
    manifest = _manifest(tiny_work)
    select = [h for h in manifest["history"] if h["phase"] == "select"]
    assert [h["phase"] for h in manifest["history"]] == ["select"] * 4  # no refit: the second stage learns valid
    assert [h["epoch"] for h in select] == [1, 2, 3, 4]
    assert select[-1]["train_loss"] < select[0]["train_loss"]
    assert all("val_NDCG@10" in h for h in select)
    best = max(select, key=lambda h: h["val_NDCG@10"])
    assert manifest["best_epoch"] == best["epoch"]
    stage = manifest["second_stage"]
    data = read_prepared(str(tiny_work / "prepared"))
    assert stage["cases"] == sum(s == "valid" for s in data.cases.column("split").to_pylist())
    assert 5 <= stage["fit_cases"] <= stage["cases"]
    # the scorer alone on the valid cases, ranked by the evaluation's code, is the chosen epoch's figure
    assert stage["first_stage"] == pytest.approx({k[4:]: v for k, v in best.items() if k.startswith("val_")}, abs=1e-6)
    assert manifest["validation"] == stage["cross_fitted"]  # what is served is what is reported


def test_the_saved_scorer_is_what_the_recommender_loads(tiny_work):
    data = read_prepared(str(tiny_work / "prepared"))
    trained = load_recommender(data.items, str(tiny_work / "embeddings"), model=str(tiny_work / "model"))
    plain = load_recommender(data.items, str(tiny_work / "embeddings"))
    assert trained.scorer is not None and plain.scorer is None
    assert trained.scorer.trained_on == ["train", "valid"]  # the second stage learned the valid targets
    assert trained.second_stage is not None and trained.second_stage.depth == 50 and plain.second_stage is None
    cases = list(iter_cases(user_sequences(data.events), data.cases, ["test"], data.max_history))[:5]
    states = case_states(cases, trained.vector_of, trained.params)
    assert not np.allclose(trained.scores(states), plain.scores(states))
    cold = trained.scores([ProfileState("nobody")])[0]
    np.testing.assert_allclose(cold, trained.popularity_scores())


def test_evaluation_reports_baselines_and_refuses_a_split_the_scorer_learned(tiny_work, tmp_path):
    cfg = EvaluateConfig(input=str(tiny_work / "prepared"), embeddings=str(tiny_work / "embeddings"),
                         model=str(tiny_work / "model"), output=str(tmp_path / "report"), split="test",
                         retrieval=RetrievalConfig(index=str(tmp_path / "no-index")))  # not the checkout's work/
    report = run_evaluate(cfg)
    assert list(report["methods"]) == ["popularity", "zero-shot profile", "profilerec"]
    with pytest.raises(ConfigError, match="trained on the targets of \\['valid'\\]"):
        run_evaluate(EvaluateConfig(**{**cfg.__dict__, "split": "valid"}))


def test_the_sampled_loss_trains_and_refits_without_a_second_stage(tiny_work, tmp_path):
    cfg = TrainConfig(input=str(tiny_work / "prepared"), embeddings=str(tiny_work / "embeddings"),
                      output=str(tmp_path / "model"), epochs=2, patience=2, refit=True, loss="sampled",
                      negatives=8, storage_path=str(tmp_path / "ray_train"),
                      second_stage=SecondStageConfig(depth=0))
    (tmp_path / "model" / "scorer").mkdir(parents=True)  # an earlier model's second stage, in the way
    shutil.copy(tiny_work / "model" / "scorer" / SECOND_STAGE_FILE, tmp_path / "model" / "scorer")
    manifest = run_train(cfg)
    select = [h for h in manifest["history"] if h["phase"] == "select"]
    refit = [h for h in manifest["history"] if h["phase"] == "refit"]
    assert [h["epoch"] for h in select] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and "val_NDCG@10" in h for h in select)
    assert [h["epoch"] for h in refit] == list(range(1, manifest["best_epoch"] + 1))
    assert refit[0]["cases"] > select[0]["cases"]  # the validation cases joined the training set
    assert manifest["second_stage"] is None
    data = read_prepared(str(tiny_work / "prepared"))
    trained = load_recommender(data.items, str(tiny_work / "embeddings"), model=str(tmp_path / "model"))
    assert trained.scorer is not None and trained.scorer.trained_on == ["train", "valid"]
    assert trained.second_stage is None


def test_a_finished_run_resumes_from_its_checkpoint_without_training_again(tiny_work):
    first = _manifest(tiny_work)
    again = run_train(from_dict(TrainConfig, first["config"]))
    assert again["run"] == first["run"]
    assert again["history"] == first["history"]


def test_the_benchmark_command_writes_the_table_with_published_figures(tmp_path, ray_session):
    from conftest import write_tiny_amazon
    from profilerec.cli.quality_benchmark import run_benchmark
    from profilerec.config import BenchmarkConfig, PrepareConfig

    source = write_tiny_amazon(tmp_path / "amazon-industrial", n_users=12)
    cfg = BenchmarkConfig(work_dir=str(tmp_path / "bench"), prepare=PrepareConfig(input=str(source)),
                          train=TrainConfig(epochs=2, storage_path=str(tmp_path / "ray_train")), ablation=False)
    report = run_benchmark(cfg)
    assert [r["name"] for r in report["rows"]] == ["popularity", "zero-shot profile", "profilerec (default)"]
    assert all(set(r["valid"]) >= {"HR@10", "NDCG@10"} and set(r["test"]) >= {"HR@10", "NDCG@10"} for r in report["rows"])
    table = (tmp_path / "bench" / "report" / "ablation.md").read_text()
    assert "| profilerec (default) |" in table and "| MiniOneRec (Qwen2.5 1.5B, SFT+RL) |" in table
    assert (tmp_path / "bench" / "report" / "ablation.png").stat().st_size > 1000
    # embeddings encoded from another form of the item text are encoded again, not reused
    base = str(tmp_path / "bench" / "embeddings" / "base")
    manifest = storage.read_json(storage.join(base, "manifest.json"))
    storage.write_json({**manifest, "title_repeats": 1}, storage.join(base, "manifest.json"))
    run_benchmark(cfg)
    assert items_title_repeats(base) == TITLE_REPEATS
