"""The encode job on a local Ray: its vectors are the encoder's own, each distinct text once."""

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from profilerec.batch.encode import PRECISION_FILE, choose_precision, run_encode
from profilerec.config import EncodeConfig
from profilerec.data import storage
from profilerec.data.datasets import PreparedData, read_prepared, write_prepared
from profilerec.data.schema import CASES_SCHEMA, TITLE_REPEATS, InvalidRows, clean_events, clean_items, item_text
from profilerec.data.vectors import item_texts, items_title_repeats, read_embeddings, vectors_from_arrow
from profilerec.errors import ConfigError
from profilerec.model.encoder import (
    TextEncoder,
    device_precisions,
    fastest_precision,
    measure_precisions,
    model_fingerprint,
    text_hash,
)


@pytest.mark.ray
@pytest.mark.slow
def test_item_vectors_equal_the_encoders_direct_output(tiny_work):
    data = read_prepared(str(tiny_work / "prepared"))
    table = read_embeddings(str(tiny_work / "embeddings"), "items")
    assert sorted(table.column("item_id").to_pylist()) == sorted(data.items.column("item_id").to_pylist())
    texts = dict(zip(*item_texts(data.items).to_pydict().values()))
    direct = TextEncoder().encode([texts[i] for i in table.column("item_id").to_pylist()])
    got = vectors_from_arrow(table.column("vector"))
    np.testing.assert_allclose(got, direct, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the service encodes the items it learns with the form these were encoded with
    assert items_title_repeats(str(tiny_work / "embeddings")) == TITLE_REPEATS


def test_items_learned_while_serving_take_the_text_form_of_the_embeddings(tmp_path):
    storage.write_json({"model": "default"}, str(tmp_path / "before" / "manifest.json"))  # encoded before it was recorded
    storage.write_json({"model": "default", "title_repeats": 3}, str(tmp_path / "later" / "manifest.json"))
    assert items_title_repeats(str(tmp_path / "before")) == 1
    assert items_title_repeats(str(tmp_path / "later")) == 3
    assert item_text("Bolt", "Acme", [], None, title_repeats=1) == "Bolt. Acme"


# slow: each encode job below starts encoder actors that load the model; with the session's Ray
# start they take more than a minute together on a 2-core machine
@pytest.mark.ray
@pytest.mark.slow
def test_each_distinct_event_text_is_encoded_once(tmp_path, ray_session):
    items = clean_items(pd.DataFrame({"item_id": ["1", "2"], "title": ["red drill", "blue saw"]}), InvalidRows())
    texts = ["cordless drill", "cordless drill", "saw blade", None]
    events = clean_events(pd.DataFrame({
        "event_id": ["e1", "e2", "e3", "e4"], "user_id": ["u", "u", "v", "v"], "item_id": ["1", None, "2", "2"],
        "type": ["search", "search", "tag", "click"], "ts": [1.0e9, 1.0e9 + 5, 1.0e9, 1.0e9 + 9], "text": texts,
    }), {"1", "2"}, InvalidRows())
    cases = pa.table({"user_id": ["v"], "target_event_id": ["e4"], "split": ["test"]}, schema=CASES_SCHEMA)
    write_prepared(PreparedData(events, items, cases, None), str(tmp_path / "prepared"))
    manifest = run_encode(EncodeConfig(input=str(tmp_path / "prepared"), output=str(tmp_path / "emb"),
                                       num_actors=2, num_cpus_per_actor=0.5, precision="fp32"), use_gpu=False)
    assert manifest["counts"] == {"items": 2, "texts": 2}
    assert manifest["encoded"] == 4  # 2 item texts + 2 event texts: the repeated one went through the model once
    table = read_embeddings(str(tmp_path / "emb"), "texts")
    got = dict(zip(table.column("text_hash").to_pylist(), vectors_from_arrow(table.column("vector"))))
    assert set(got) == {text_hash("cordless drill"), text_hash("saw blade")}
    direct = TextEncoder().encode(["cordless drill", "saw blade"])
    np.testing.assert_allclose(got[text_hash("cordless drill")], direct[0], atol=2e-5)
    np.testing.assert_allclose(got[text_hash("saw blade")], direct[1], atol=2e-5)


def write_search_log(folder, texts):
    """Prepared data of two items and one user's search events with `texts`, in `folder`."""
    items = clean_items(pd.DataFrame({"item_id": ["1", "2"], "title": ["red drill", "blue saw"]}), InvalidRows())
    n = len(texts)
    events = clean_events(pd.DataFrame({
        "event_id": [f"e{i}" for i in range(n)], "user_id": ["u"] * n, "item_id": ["1"] * n,
        "type": ["search"] * n, "ts": [1.0e9 + i for i in range(n)], "text": texts,
    }), {"1", "2"}, InvalidRows())
    cases = pa.table({"user_id": ["u"], "target_event_id": ["e0"], "split": ["test"]}, schema=CASES_SCHEMA)
    write_prepared(PreparedData(events, items, cases, None), str(folder))


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_on_a_grown_log_encodes_only_the_new_texts(tmp_path, ray_session):
    cfg = EncodeConfig(input=str(tmp_path / "prepared"), output=str(tmp_path / "emb"), num_actors=1,
                       num_cpus_per_actor=0.5, precision="fp32")
    write_search_log(tmp_path / "prepared", ["cordless drill", "saw blade", "cordless drill"])
    first = run_encode(cfg, use_gpu=False)
    assert first["encoded"] == 4  # 2 item texts + 2 distinct event texts
    cache = storage.read_table(first["cache"])
    assert cache.num_rows == 4

    write_search_log(tmp_path / "prepared",
                     ["cordless drill", "saw blade", "cordless drill", "drill bits", "saw blade", "wood glue"])
    second = run_encode(cfg, use_gpu=False)
    assert second["encoded"] == 2 and second["cache"] == first["cache"]
    assert storage.read_table(first["cache"]).num_rows == 6  # only the two new texts were added
    assert second["counts"] == {"items": 2, "texts": 4}
    table = read_embeddings(str(tmp_path / "emb"), "texts")
    got = dict(zip(table.column("text_hash").to_pylist(), vectors_from_arrow(table.column("vector"))))
    texts = ["cordless drill", "saw blade", "drill bits", "wood glue"]
    direct = TextEncoder().encode(texts)
    for text, vector in zip(texts, direct):
        np.testing.assert_allclose(got[text_hash(text)], vector, atol=2e-5)


@pytest.mark.ray
@pytest.mark.slow
def test_bf16_vectors_stay_within_cosine_0_999_of_fp32_in_a_cache_of_their_own(tmp_path, ray_session):
    texts = ["cordless drill", "saw blade with 40 carbide teeth for hardwood and plywood", "wood glue"]
    write_search_log(tmp_path / "prepared", texts)
    runs = {precision: run_encode(EncodeConfig(input=str(tmp_path / "prepared"), output=str(tmp_path / precision),
                                               num_actors=1, num_cpus_per_actor=0.5, precision=precision,
                                               cache=str(tmp_path / "cache")), use_gpu=False)
            for precision in ("fp32", "bf16")}
    assert runs["bf16"]["precision"] == "bf16" and runs["bf16"]["encoded"] == 5  # nothing taken from fp32's cache
    assert runs["bf16"]["cache"] != runs["fp32"]["cache"]
    table = read_embeddings(str(tmp_path / "bf16"), "texts")
    got = dict(zip(table.column("text_hash").to_pylist(), vectors_from_arrow(table.column("vector"))))
    fp32 = TextEncoder().encode(texts)
    ours = np.stack([got[text_hash(t)] for t in texts])
    cosine = (ours * fp32).sum(axis=1)
    assert cosine.min() >= 0.999, cosine
    assert np.abs(ours - fp32).max() > 1e-4  # bf16 really ran: fp32 would agree to ~1e-6


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, tf32, bf16, fp16, int8, not 'fp8'"):
        choose_precision(EncodeConfig(precision="fp8"), use_gpu=False)
    with pytest.raises(ConfigError, match="precision must be one of fp32, tf32, bf16, fp16, int8, not 'fp8'"):
        TextEncoder(precision="fp8")


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_cuda_only_precisions_are_refused_on_a_cpu(precision):
    with pytest.raises(ConfigError, match=f"precision {precision} is for CUDA GPUs, not cpu"):
        choose_precision(EncodeConfig(precision=precision), use_gpu=False)
    with pytest.raises(ConfigError, match=f"precision {precision} is for CUDA GPUs, not cpu"):
        TextEncoder(device="cpu", precision=precision)
    with pytest.raises(ConfigError, match="setting packing: 'yes' is not one of auto, on, off"):
        choose_precision(EncodeConfig(precision="fp32", packing="yes"), use_gpu=False)


def test_the_fastest_precision_within_cosine_0_999_of_fp32_is_chosen():
    measured = {"fp32": {"texts_per_s": 100.0, "min_cosine": 1.0},
                "bf16": {"texts_per_s": 300.0, "min_cosine": 0.9995},
                "fp16": {"texts_per_s": 400.0, "min_cosine": 0.998}}
    assert fastest_precision(measured) == "bf16"  # fp16 is faster but too far from fp32
    assert fastest_precision({**measured, "bf16": {"texts_per_s": 90.0, "min_cosine": 0.9999}}) == "fp32"


def test_measuring_the_precisions_times_each_against_fp32():
    texts = ["cordless drill", "saw blade with 40 carbide teeth for hardwood and plywood", "wood glue"] * 4
    measured = measure_precisions("default", texts, ["bf16"], batch_size=4)
    assert set(measured) == {"fp32", "bf16"}
    assert measured["fp32"]["min_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert 0.99 < measured["bf16"]["min_cosine"] < 0.99999  # bf16 really ran, close to fp32
    assert all(m["texts_per_s"] > 0 for m in measured.values())


@pytest.mark.ray
@pytest.mark.slow
def test_precision_auto_is_measured_once_per_device_then_remembered(tmp_path, ray_session):
    texts = [f"cordless drill model {i}" for i in range(60)] + ["saw blade with 40 carbide teeth for hardwood"] * 3
    write_search_log(tmp_path / "prepared", texts)
    # batch_size 2: blocks of 32 texts, so the job writes several parts and has a steady rate
    cfg = EncodeConfig(input=str(tmp_path / "prepared"), output=str(tmp_path / "first"), num_actors=1,
                       num_cpus_per_actor=0.5, batch_size=2, cache=str(tmp_path / "cache"))
    first = run_encode(cfg, use_gpu=False)
    choice = first["precision_choice"]
    assert choice["chosen_by"] == "measured" and first["precision"] in device_precisions("cpu")
    assert set(choice["measured"]) == set(device_precisions("cpu"))
    assert first["precision"] == fastest_precision(choice["measured"])
    assert first["encoded"] == 63 and first["startup_seconds"] > 0 and first["steady_texts_per_second"] > 0
    memo = storage.read_json(str(tmp_path / "cache" / PRECISION_FILE))
    kept = memo[model_fingerprint("default", cfg.max_length, "auto")][choice["device"]]
    assert kept["precision"] == first["precision"] and kept["measured"] == choice["measured"]

    second = run_encode(dataclasses.replace(cfg, output=str(tmp_path / "second")), use_gpu=False)
    assert second["precision_choice"]["chosen_by"] == "remembered"
    assert second["precision_choice"]["measured"] == choice["measured"]  # not measured again
    assert second["precision"] == first["precision"] and second["encoded"] == 0  # the same cache

    # what precision.json says is what auto runs at, whatever a new measurement would say
    other = next(p for p in device_precisions("cpu") if p != first["precision"])
    kept["precision"] = other
    storage.write_json(memo, str(tmp_path / "cache" / PRECISION_FILE))
    assert choose_precision(cfg, use_gpu=False)["precision"] == other
    assert choose_precision(dataclasses.replace(cfg, precision="fp32"), use_gpu=False) == \
        {"precision": "fp32", "chosen_by": "setting"}
