"""The node's shared files (data/node_files.py): made once, kept while any process uses them,
removed once none does; the files of processes that ended are removed too."""

import os
import subprocess
import sys

import numpy as np
from profilerec.data.node_files import remove_unused

# a process that makes (or finds) a shared matrix, says where it is, and keeps it until told to end
USER = """
import sys
import numpy as np
from profilerec.data.node_files import node_file
made = []
def write(path):
    made.append(path)
    with open(path, "wb") as f:
        np.save(f, np.arange(4.0))
path = node_file("rows-x.npy", write)
print(path, bool(made), flush=True)
sys.stdin.read()
"""


def _start(tmp_path, code):
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})


def _ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_shared_file_is_made_once_kept_while_used_and_removed_when_no_process_uses_it(tmp_path):
    first, second = _start(tmp_path, USER), _start(tmp_path, USER)
    path, made_first = first.stdout.readline().split()
    path_second, made_second = second.stdout.readline().split()
    assert path == path_second and sorted([made_first, made_second]) == ["False", "True"]  # one made it
    folder = os.path.dirname(path)
    first.communicate("")
    assert remove_unused(folder) == []  # the second process still uses it
    np.testing.assert_array_equal(np.load(path), np.arange(4.0))
    second.communicate("")
    assert remove_unused(folder) == ["rows-x.npy"]
    assert os.listdir(folder) == []
    third = _start(tmp_path, USER)  # made again when needed again
    assert third.stdout.readline().split()[1] == "True"
    third.communicate("")


def test_the_files_of_processes_that_ended_are_removed_and_the_rest_kept(tmp_path):
    folder = tmp_path / "node"
    folder.mkdir()
    ended = _ended_pid()
    gone = [f"0123456789abcdef-{ended}.sock", f"0123456789abcdef-{ended}.board",
            f"0123456789abcdef-{ended}.board.new", f"rows-y.npy.{ended}.partial"]
    kept = [f"0123456789abcdef-{os.getpid()}.board", "log-key", "notes.txt"]
    for name in gone + kept:
        (folder / name).write_bytes(b"x")
    (folder / f"index-abc.{ended}.partial").mkdir()  # a copy of a bucket's index, half made
    assert sorted(remove_unused(str(folder))) == sorted(gone + [f"index-abc.{ended}.partial"])
    assert sorted(os.listdir(folder)) == sorted(kept)


def test_a_process_cleans_the_folder_when_it_first_uses_it(tmp_path):
    folder = tmp_path / f"profilerec-{os.getuid()}"
    folder.mkdir(mode=0o700)
    stale = folder / f"0123456789abcdef-{_ended_pid()}.board"
    stale.write_bytes(b"x" * 1000)
    (folder / "rows-z.npy").write_bytes(b"x")  # made by a process that ended: its lock is free
    (folder / "rows-z.npy.lock").write_bytes(b"")
    process = _start(tmp_path, "from profilerec.data.node_files import node_private_dir; print(node_private_dir())")
    assert process.communicate("")[0].strip() == str(folder)
    assert os.listdir(folder) == []
