"""Reading and writing job inputs and outputs at any URI through `pyarrow.fs`.

A location is a local path (`work/prepared`), or a URI (`s3://bucket/prefix`, `gs://...`,
`file:///abs/path`). S3-compatible servers are reached with the usual AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or `?endpoint_override=host:port&scheme=http`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import tempfile
import uuid
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from profilerec.errors import DataError


def is_uri(location: str) -> bool:
    """True for `scheme://...` locations (object stores, file://), False for plain paths."""
    return "://" in location


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a location."""
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot open storage location {location}: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(location)


def absolute(location: Optional[str]) -> Optional[str]:
    """A local path made absolute (Ray workers and actors run in other directories); URIs as they are."""
    if location is None or is_uri(location):
        return location
    return os.path.abspath(location)


def join(location: str, *parts: str) -> str:
    """`location/part/...`, keeping a URI's query string (endpoint settings) at the end."""
    base, query = (location.split("?", 1) + [""])[:2] if is_uri(location) else (location, "")
    joined = posixpath.join(base, *parts) if is_uri(location) else os.path.join(base, *parts)
    return f"{joined}?{query}" if query else joined


def exists(location: str) -> bool:
    """True when a file or folder is at `location`."""
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(location: str, durable: bool = False) -> None:
    """Create the folder `location` and its parents (a no-op on object stores without folders).

    With `durable`, every folder created on a local disk is also recorded durably in its parent
    (see fsync_dir), so a power cut cannot lose it with the files written into it afterwards.
    """
    fs, path = resolve(location)
    if durable and isinstance(fs, pafs.LocalFileSystem):
        _makedirs_durable(path)
    else:
        fs.create_dir(path, recursive=True)


def _makedirs_durable(path: str) -> None:
    """os.makedirs of a local folder, fsyncing the parent of each folder it creates."""
    missing = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise
        # also when another process created it first: its fsync may not have happened yet
        fsync_dir(os.path.dirname(folder))


def delete(location: str) -> None:
    """Remove a file or a whole folder; nothing happens when it does not exist."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(location: str, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly inside folder `location`, sorted."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def list_folders(location: str) -> list[str]:
    """Names of the folders directly inside folder `location`, sorted."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def fingerprint(location: str) -> str:
    """A name for the folder's current contents: its files' paths, sizes and modification times."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    digest = hashlib.blake2b(location.encode("utf-8"), digest_size=12)
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        digest.update(f"|{info.path}|{info.size}|{info.mtime_ns}".encode("utf-8"))
    return digest.hexdigest()


def read_bytes(location: str) -> bytes:
    """The whole file at `location`; DataError naming it when it is missing."""
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"file not found: {location}") from None


def write_bytes(data: bytes, location: str, durable: bool = False) -> None:
    """Write a whole file so that readers never see it half-written.

    Local files go through a temporary file and a rename (fsync'd when `durable`); object stores
    replace an object in one put, so they are written directly.
    """
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        if durable:
            _makedirs_durable(os.path.dirname(path))
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a half-written file would keep a full disk full
                os.remove(tmp)
            raise
        if durable:
            fsync_dir(os.path.dirname(path))
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in local folder `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(location: str) -> Any:
    """Parse the JSON file at `location`."""
    data = read_bytes(location)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise DataError(f"{location} is not valid JSON: {e}") from None


def write_json(obj: Any, location: str, durable: bool = False) -> None:
    """Write `obj` as indented JSON (see write_bytes)."""
    write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), location, durable)


def read_table(location: str, columns: Optional[list[str]] = None) -> pa.Table:
    """A Parquet file, or a folder of Parquet files, as one table."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DataError(f"Parquet input not found: {location}")
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read Parquet at {location}: {e}") from None


def read_schema(location: str) -> pa.Schema:
    """The schema of a Parquet file (or folder of files), read from the footer alone."""
    try:
        return _parquet_dataset(location).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read Parquet at {location}: {e}") from None


def iter_tables(location: str, rows: int, columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
    """A Parquet file (or folder of files) as consecutive tables of about `rows` rows, read as
    they are consumed: memory stays at one chunk however large the file is."""
    try:
        dataset = _parquet_dataset(location)
        for batch in dataset.to_batches(columns=columns, batch_size=rows, batch_readahead=1, fragment_readahead=1):
            if batch.num_rows:
                yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read Parquet at {location}: {e}") from None


def _parquet_dataset(location: str) -> ds.Dataset:
    """A Parquet file (or folder of files) as an Arrow dataset scanned without pre-buffering (it
    reads ahead row groups until much of the file is in memory); DataError when it is absent."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DataError(f"Parquet input not found: {location}")
    parquet = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False))
    return ds.dataset(path, filesystem=fs, format=parquet)


@contextlib.contextmanager
def table_writer(location: str, schema: pa.Schema) -> Iterator[Any]:
    """A pyarrow ParquetWriter for one file at `location`, written chunk by chunk (bounded
    memory). Local files are written to a temporary name and renamed on success, so readers
    never see half a file; on an object store the object appears when the writer closes."""
    fs, path = resolve(location)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local else path
    parent = posixpath.dirname(target)
    if parent:
        fs.create_dir(parent, recursive=True)
    try:
        with pq.ParquetWriter(target, schema, filesystem=fs) as writer:
            yield writer
    except BaseException:
        if local and os.path.exists(target):
            os.remove(target)
        raise
    if local:
        os.replace(target, path)


# rows per Parquet row group: a reader streaming the file (iter_tables) holds one group at a time
ROW_GROUP_ROWS = 1 << 16


def write_table(table: pa.Table, location: str, durable: bool = False) -> None:
    """Write `table` as one Parquet file at `location` (replacing it whole; see write_bytes), in
    row groups of ROW_GROUP_ROWS."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS)
    write_bytes(buf.getvalue(), location, durable)


def create_private_file(path: str, data: bytes) -> None:
    """Create local file `path` holding `data`, owner-only from its first byte; when it exists
    already (another process made it first), it is kept as it is."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(path):
        return
    # written whole under a temporary name, then linked into place: a process starting at the
    # same time sees either no file or the whole of it, never an empty one, and link never
    # replaces the file another process linked first (both then use that one)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.remove(tmp)
    fsync_dir(folder)


def local_dir(location: str) -> str:
    """A local folder with the contents of `location` (copied once into a cache for remote URIs)."""
    if not is_uri(location) or location.startswith("file://"):
        path = location[len("file://"):] if location.startswith("file://") else location
        return os.path.abspath(path)
    cache = os.path.join(tempfile.gettempdir(), "profilerec-cache", uuid.uuid5(uuid.NAMESPACE_URL, location).hex)
    if not os.path.isdir(cache):
        fs, path = resolve(location)
        tmp = f"{cache}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp)  # copy_files writes into the folder, it does not make it
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, cache)
    return cache


def upload_dir(local: str, location: str) -> None:
    """Copy local folder `local` to `location` (no-op when they are the same place)."""
    if not is_uri(location) and os.path.abspath(location) == os.path.abspath(local):
        return
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
