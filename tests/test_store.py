"""The shard's write-ahead log on real storage: local files and a real S3 API server (moto).

Restarts are new ShardStore objects on the same root, crashes are bytes left in the files the
way an interrupted write leaves them, and failing disks are writes that stop part way."""

import errno
import logging
import os

import pyarrow.fs as pafs
import pytest
from conftest import free_port
from profilerec.data import storage
from profilerec.data.schema import Event
from profilerec.service.shard_store import ShardStore

BUCKET = "profilerec-store-test"


def events(tag, n):
    return [Event(f"{tag}-{k}", f"user-{k % 3}", "click", 1000.0 + k, item_id=f"i{k}") for k in range(n)]


def ids(logged):
    return [e.event_id for e in logged]


def segment_file(root):
    wal = os.path.join(root, "shard-0000", "wal")
    (name,) = os.listdir(wal)
    return os.path.join(wal, name)


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free localhost port with an empty bucket; yields the port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                               endpoint_override=f"127.0.0.1:{port}", allow_bucket_creation=True)
        s3.create_dir(BUCKET)
        yield port
    finally:
        server.stop()


@pytest.fixture
def s3_root(s3_server, monkeypatch, request):
    """A fresh state location in the bucket, reached with `?endpoint_override=` as users configure it."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    return f"s3://{BUCKET}/{request.node.name}?endpoint_override=127.0.0.1:{s3_server}&scheme=http"


# -- object stores: one object per append -------------------------------------------------------


def test_a_restarted_shard_on_an_object_store_never_overwrites_acknowledged_events(s3_root):
    a, b = events("a", 4), events("b", 3)
    ShardStore(s3_root, 0).append(a)
    restarted = ShardStore(s3_root, 0)
    restarted.append(b)
    snapshot, _, logged = ShardStore(s3_root, 0).load()
    assert snapshot is None
    assert ids(logged) == ids(a + b)
    assert storage.list_files(restarted.wal_dir) == ["0000000000.000001.jsonl", "0000000000.000002.jsonl"]


# -- local disks: a torn tail never poisons the log ---------------------------------------------


def test_a_torn_tail_is_cut_at_open_so_later_batches_survive(tmp_path, caplog):
    a, b = events("a", 3), events("b", 4)
    ShardStore(str(tmp_path), 0).append(a)
    path = segment_file(tmp_path)
    complete = open(path, "rb").read()
    torn = b'{"event_id": "half'
    with open(path, "ab") as f:  # a crash mid-append: part of a record that was never acknowledged
        f.write(torn)
    with caplog.at_level(logging.WARNING, logger="profilerec.service.shard_store"):
        reopened = ShardStore(str(tmp_path), 0)
    assert open(path, "rb").read() == complete
    assert f"{len(torn)} bytes" in caplog.text
    reopened.append(b)
    _, _, logged = ShardStore(str(tmp_path), 0).load()
    assert ids(logged) == ids(a + b)


def test_a_tail_without_any_complete_record_is_cut_to_an_empty_file(tmp_path):
    ShardStore(str(tmp_path), 0)
    path = os.path.join(tmp_path, "shard-0000", "wal", "0000000000.jsonl")
    with open(path, "wb") as f:
        f.write(b'{"event_id": "x", "user')
    store = ShardStore(str(tmp_path), 0)
    assert os.path.getsize(path) == 0
    store.append(events("a", 2))
    assert ids(ShardStore(str(tmp_path), 0).load()[2]) == ["a-0", "a-1"]


class HalfWriteThenFull:
    """A file object whose next write stores half of the data and then fails as a full disk does."""

    def __init__(self, f):
        self._f = f
        self.failed = False

    def write(self, data):
        if self.failed:
            return self._f.write(data)
        self.failed = True
        self._f.write(bytes(data[: len(data) // 2]))
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_a_write_that_fails_part_way_leaves_no_partial_record(tmp_path, monkeypatch):
    a, refused, c = events("a", 3), events("refused", 5), events("c", 2)
    store = ShardStore(str(tmp_path), 0)
    store.append(a)
    path = segment_file(tmp_path)
    before = open(path, "rb").read()
    failing = []

    def full_disk_open(*args, **kwargs):
        failing.append(HalfWriteThenFull(open(*args, **kwargs)))
        return failing[-1]

    monkeypatch.setattr("profilerec.service.shard_store.open", full_disk_open, raising=False)
    with pytest.raises(OSError) as refused_error:
        store.append(refused)
    monkeypatch.undo()
    assert refused_error.value.errno == errno.ENOSPC
    assert failing and failing[0].failed, "the append went through the failing file"
    assert open(path, "rb").read() == before
    store.append(c)
    _, _, logged = ShardStore(str(tmp_path), 0).load()
    assert ids(logged) == ids(a + c)


# -- local disks: new files and folders survive a power cut -------------------------------------


@pytest.fixture
def fsynced_dirs(monkeypatch):
    """The folders fsync'd through storage.fsync_dir (which still runs), in call order."""
    calls = []
    real = storage.fsync_dir

    def record(path):
        calls.append(os.path.abspath(path))
        real(path)

    monkeypatch.setattr(storage, "fsync_dir", record)
    return calls


def test_opening_a_shard_on_a_fresh_root_fsyncs_the_parent_of_every_created_folder(tmp_path, fsynced_dirs):
    root = tmp_path / "state"
    ShardStore(str(root), 0)
    assert set(fsynced_dirs) == {str(tmp_path), str(root), str(root / "shard-0000")}
    fsynced_dirs.clear()
    ShardStore(str(root), 0)
    assert fsynced_dirs == [], "existing folders need no fsync"


def test_the_append_that_creates_a_segment_file_fsyncs_the_wal_folder_once(tmp_path, fsynced_dirs):
    store = ShardStore(str(tmp_path), 0)
    wal = str(tmp_path / "shard-0000" / "wal")
    fsynced_dirs.clear()
    store.append(events("a", 2))
    assert fsynced_dirs == [wal]
    store.append(events("b", 2))
    assert fsynced_dirs == [wal], "appends to an existing segment file fsync only the file"
