"""A shard's board read by another reader, without Ray: what the ingress scores is what the shard
would have answered, and a board that cannot be trusted is a miss."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
from profilerec.data.learned import VectorLog
from profilerec.data.node_files import remove_unused
from profilerec.service.profile_board import BoardReader, BoardWriter, user_key
from profilerec.service.shard import ProfileShard, max_state_bytes, recommendation, state_codec
from profilerec.service.shard_store import ShardStore
from test_shard import events, recommender


def shard_with_board(tmp_path, slots):
    rec = recommender()
    board = BoardWriter(str(tmp_path / "boards" / "shard-1.board"), slots, max_state_bytes(rec))
    return ProfileShard(0, rec, ShardStore(str(tmp_path / "state"), 0), board=board), BoardReader(board.path)


def board_answer(reader, user, **options):
    """What an ingress replica answers from the board: its own recommender and codec."""
    packed = reader.get(user)
    if packed is None:
        return None
    ingress = recommender()
    state, _ = state_codec(ingress).unpack(user, packed, ingress.index.dim, counters=False)
    return recommendation(ingress, state, **options)


def test_board_reads_answer_what_the_shard_answers_and_follow_every_write(tmp_path):
    (tmp_path / "boards").mkdir()
    shard, reader = shard_with_board(tmp_path, slots=1 << 16)  # no two of these users share a slot
    users = [f"user-{n}" for n in range(12)]
    for n, user in enumerate(users):
        shard.apply(events(user, 0, 3 + n % 5, item_offset=n))
    for user in users:
        for options in ({"k": 5}, {"k": 3, "exclude_seen": True}):
            assert board_answer(reader, user, **options) == shard.recommend(user, **options)
    before = board_answer(reader, "user-3", k=20)
    shard.apply(events("user-3", 10, 4, item_offset=11))  # read-your-writes: the board follows at once
    after = board_answer(reader, "user-3", k=20)
    assert after == shard.recommend("user-3", k=20) and after != before
    assert reader.get("nobody") is None  # unknown users are a miss: the shard answers them (popularity)
    shard.forget("user-3")
    assert reader.get("user-3") is None


def test_a_user_whose_slot_another_took_is_a_miss_until_read_again(tmp_path):
    (tmp_path / "boards").mkdir()
    shard, reader = shard_with_board(tmp_path, slots=1)
    shard.apply(events("alice", 0, 3))
    shard.apply(events("bob", 0, 3, item_offset=7))
    assert reader.get("alice") is None and reader.get("bob") is not None
    shard.recommend("alice", k=3)  # a read through the shard puts the user back
    assert board_answer(reader, "alice", k=3) == shard.recommend("alice", k=3)
    assert reader.get("bob") is None


def test_a_slot_being_written_or_damaged_is_a_miss(tmp_path):
    (tmp_path / "boards").mkdir()
    shard, reader = shard_with_board(tmp_path, slots=4)
    shard.apply(events("alice", 0, 3))
    board = shard.board.board
    i, at = board.slot(user_key("alice"))
    board.seqs[i] += 1  # the shard is half-way through writing it
    assert reader.get("alice") is None
    board.seqs[i] += 1
    assert reader.get("alice") is not None
    board.mm[at + 40] ^= 0xFF  # a torn copy: the CRC no longer matches
    assert reader.get("alice") is None


def test_a_reader_sees_its_writer_die_and_a_later_process_removes_the_dead_board(tmp_path):
    code = ("import sys; from profilerec.data.node_files import process_file; "
            "from profilerec.service.profile_board import BoardWriter; "
            "w = BoardWriter(process_file('shard-a', '.board'), 8, 1000); w.put('alice', b'state'); "
            "print(w.path, flush=True); sys.stdin.read()")
    writer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    path = writer.stdout.readline().strip()
    reader = BoardReader(path)
    assert reader.writer_alive() and reader.get("alice") == b"state"
    assert os.stat(path).st_blocks * 512 >= os.stat(path).st_size  # allocated: a full disk cannot SIGBUS a write
    assert remove_unused(os.path.dirname(path)) == [] and os.path.exists(path)  # its shard runs: kept
    writer.communicate("")  # the shard process ends (as when Ray kills it)
    assert not reader.writer_alive()
    reader.close()
    assert remove_unused(os.path.dirname(path)) == [os.path.basename(path)]
    assert not os.path.exists(path)


def test_the_board_carries_the_catalog_fingerprint_of_the_items_files_applied(tmp_path):
    state = str(tmp_path / "state")
    writer_log, reader_log = VectorLog(state, "items"), VectorLog(state, "items")
    fingerprints = []
    for n in range(2):
        writer_log.append(pa.table({"item_id": [f"new-{n}"]}), np.ones((1, 8), dtype=np.float32))
        list(writer_log.unapplied())  # the writer applies its own file like any other, in name order
        list(reader_log.unapplied())
        assert reader_log.fingerprint == writer_log.fingerprint  # the same files in the same order
        fingerprints.append(writer_log.fingerprint)
    assert len(set(fingerprints + [0])) == 3  # each file applied changes it
    (tmp_path / "boards").mkdir()
    shard, reader = shard_with_board(tmp_path, slots=4)
    shard.board.set_fingerprint(writer_log.fingerprint)
    assert reader.fingerprint() == writer_log.fingerprint
