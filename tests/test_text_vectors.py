"""The event-text vector store: lookups, learned texts, one node copy per embeddings version."""

import os

import numpy as np
import pyarrow as pa
from profilerec.data.storage import write_table
from profilerec.data.vectors import vectors_to_arrow
from profilerec.model.encoder import text_hash
from profilerec.model.text_vectors import load_text_vectors

DIM = 8


def _texts_table(texts: list[str], seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    vectors = np.random.default_rng(seed).normal(size=(len(texts), DIM)).astype(np.float32)
    return pa.table({"text_hash": [text_hash(t) for t in texts], "vector": vectors_to_arrow(vectors)}), vectors


def _folder(tmp_path, name: str, table: pa.Table, files: int = 3) -> str:
    folder = tmp_path / name
    folder.mkdir()
    step = -(-table.num_rows // files)
    for n in range(files):  # several files, as the encode job writes them
        write_table(table.slice(n * step, step), str(folder / f"part-{n}.parquet"))
    return str(folder)


def test_every_text_of_the_folder_is_found_with_its_vector_and_others_are_not(tmp_path):
    texts = [f"query number {n}" for n in range(500)]
    table, vectors = _texts_table(texts)
    store = load_text_vectors(_folder(tmp_path, "texts", table), cache_dir=str(tmp_path / "node"))
    assert len(store) == 500
    for n in (0, 1, 250, 499):
        np.testing.assert_array_equal(store.get(text_hash(texts[n])), vectors[n])
    assert store.get(text_hash("never encoded")) is None
    assert text_hash(texts[7]) in store and text_hash("never encoded") not in store


def test_learned_texts_are_added_on_top(tmp_path):
    table, vectors = _texts_table(["a", "b"])
    store = load_text_vectors(_folder(tmp_path, "texts", table, files=1), cache_dir=str(tmp_path / "node"))
    learned = np.ones(DIM, dtype=np.float32)
    store.update([(text_hash("c"), learned), (text_hash("a"), -learned)])
    np.testing.assert_array_equal(store.get(text_hash("c")), learned)
    np.testing.assert_array_equal(store.get(text_hash("a")), vectors[0])  # a known text keeps its vector
    assert len(store) == 3
    assert load_text_vectors(str(tmp_path / "missing"), cache_dir=str(tmp_path / "node")).get(text_hash("a")) is None


def test_processes_on_a_node_share_one_copy_and_a_new_encode_run_gets_a_new_one(tmp_path):
    texts = [f"t{n}" for n in range(50)]
    table, _ = _texts_table(texts)
    folder = _folder(tmp_path, "texts", table)
    node = tmp_path / "node"
    load_text_vectors(folder, cache_dir=str(node))
    copies = sorted(os.listdir(node))
    assert len([c for c in copies if not c.endswith((".lock", ".make"))]) == 1 and not [c for c in copies if "partial" in c]
    load_text_vectors(folder, cache_dir=str(node))
    assert sorted(os.listdir(node)) == copies
    grown, grown_vectors = _texts_table(texts + ["new text"], seed=1)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    for n, part in enumerate((grown.slice(0, 30), grown.slice(30))):
        write_table(part, os.path.join(folder, f"part-{n}.parquet"))
    store = load_text_vectors(folder, cache_dir=str(node))
    np.testing.assert_array_equal(store.get(text_hash("new text")), grown_vectors[-1])
    np.testing.assert_array_equal(store.get(text_hash("t3")), grown_vectors[3])
