"""Fine-tuning on Ray Train (one CPU worker, gloo): the loss goes down, runs resume."""

import os

import pytest
import torch
from profilerec.config import FinetuneConfig
from profilerec.data.datasets import read_prepared
from profilerec.model.encoder import TextEncoder
from profilerec.model.profile import ProfileParams
from profilerec.model.replay import iter_cases, user_sequences
from profilerec.runtime.cluster import MODEL_WORKER_MALLOC
from profilerec.runtime.parallel import usable_cores
from profilerec.training.finetune import _item_texts, case_loss, epoch_batches, run_finetune
from profilerec.training.harness import prefetch


def training_loss(model: str, cases, texts) -> float:
    encoder = TextEncoder(model, max_length=32)
    with torch.no_grad():
        return float(case_loss(encoder, cases, texts, ProfileParams(), temperature=0.05))


@pytest.mark.ray
@pytest.mark.slow
def test_one_epoch_lowers_the_loss_and_a_longer_run_resumes(tiny_work, tmp_path, ray_session):
    data = read_prepared(str(tiny_work / "prepared"))
    cases = list(iter_cases(user_sequences(data.events), data.cases, ["train"], data.max_history))
    texts = _item_texts(data.items)
    cfg = FinetuneConfig(input=str(tiny_work / "prepared"), output=str(tmp_path / "model"), epochs=1,
                         batch_size=16, max_length=32, learning_rate=1e-4, warmup_ratio=0.0,
                         eval_max_cases=30, patience=5, storage_path=str(tmp_path / "ray_train"))
    before = training_loss("default", cases, texts)
    manifest = run_finetune(cfg)
    assert os.path.isfile(tmp_path / "model" / "encoder" / "config.json")
    # the last epoch's encoder (the output is whichever epoch validates best, maybe the untuned one)
    after = training_loss(os.path.join(manifest["last_checkpoint"], "encoder"), cases, texts)
    assert after < before, (before, after)
    assert [h["epoch"] for h in manifest["history"]] == [0, 1]  # epoch 0: the untuned encoder
    first = manifest["history"][1]
    # the job times its own steady-state steps (the first step is warm-up)
    assert first["steady_steps"] == first["steps"] - 1 > 0 and first["samples_per_s"] > 0
    # Ray starts workers with OMP_NUM_THREADS=1: the only worker must still train on every core
    assert first["torch_threads"] == usable_cores()
    # the worker ran with the malloc settings that keep a step's freed activations for the next
    assert first["glibc_tunables"] == MODEL_WORKER_MALLOC

    resumed = run_finetune(FinetuneConfig(**{**cfg.__dict__, "epochs": 2}))
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["history"][1] == first  # epoch 1 came from the checkpoint, not trained again
    assert resumed["run"] == manifest["run"]


def test_prefetch_keeps_the_order_and_raises_the_producers_error():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        list(prefetch(failing()))


def test_epoch_batches_deal_each_case_to_one_worker_per_epoch():
    cfg = FinetuneConfig(batch_size=4, seed=3)
    for n, world in ((21, 2), (9, 2), (10, 3)):
        ranks = [epoch_batches(n, cfg, 0, rank, world) for rank in range(world)]
        assert len({len(batches) for batches in ranks}) == 1  # DDP: every worker steps equally often
        dealt = [row for batches in ranks for batch in batches for row in batch]
        assert set(dealt) == set(range(n)) and len(dealt) < n + world  # at most a padding case per worker
    assert epoch_batches(21, cfg, 1) != epoch_batches(21, cfg, 0)  # reshuffled every epoch
