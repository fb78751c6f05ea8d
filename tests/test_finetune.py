"""Fine-tuning on Ray Train (one CPU worker, gloo): the loss goes down, runs resume."""

import os

import torch

from profilerec.config import FinetuneConfig
from profilerec.datasets import read_prepared
from profilerec.encoder import TextEncoder
from profilerec.profile import ProfileParams
from profilerec.replay import iter_cases, user_sequences
from profilerec.training import _item_texts, case_loss, run_finetune


def training_loss(model: str, cases, texts) -> float:
    encoder = TextEncoder(model, max_length=32)
    with torch.no_grad():
        return float(case_loss(encoder, cases, texts, ProfileParams(), temperature=0.05))


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

    resumed = run_finetune(FinetuneConfig(**{**cfg.__dict__, "epochs": 2}))
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["history"][1] == first  # epoch 1 came from the checkpoint, not trained again
    assert resumed["run"] == manifest["run"]
