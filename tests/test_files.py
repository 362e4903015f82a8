"""Atomic writes: the target holds the old content or the new, never a partial file; a folder that
cannot take files, and a disk that fills up, are reported with the path."""

import errno
import json
import os

import pytest
from os_faults import python_code, run_on_tmpfs

from tfbn.utils.files import (
    atomic_write,
    atomic_write_text,
    check_writable_dir,
    save_model_atomically,
)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")

    def fail_halfway(file):
        file.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail_halfway)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def test_written_file_has_the_content_and_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "table.md"
    atomic_write_text(target, "| a |\n")
    assert target.read_text() == "| a |\n"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_model_atomically_needs_keras_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.keras"):
        save_model_atomically(object(), tmp_path / "model.h5")


# ------------------------------------------------------------------------- faults of the disk
def test_writable_dir_check_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_writable_dir(target) == target
    assert check_writable_dir(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_writable_dir_check_names_the_file_in_the_way(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (blocker, blocker / "sub" / "dir"):
        with pytest.raises(NotADirectoryError) as raised:
            check_writable_dir(target)
        assert raised.value.filename == str(blocker)
        assert raised.value.errno == errno.ENOTDIR


# Run in a process whose tmpfs at M is read-only or full; prints what was raised.
_PROBE = """
import json, os, sys
from tfbn.utils.files import atomic_write_text, check_writable_dir
m = os.environ["M"]
out = {}
calls = {
    "check": lambda: check_writable_dir(os.path.join(m, "new", "dir")),
    "write": lambda: atomic_write_text(os.path.join(m, "result.json"), "new" * 9999),
}
for name, call in calls.items():
    try:
        call()
        out[name] = None
    except OSError as error:
        out[name] = [error.errno, error.filename, str(error)]
out["left"] = sorted(os.listdir(m))
out["content"] = open(os.path.join(m, "result.json")).read()
print(json.dumps(out))
"""


def _probe(mount, fault: str) -> dict:
    """What `_PROBE` saw on a tmpfs at `mount` that holds an old result.json, then `fault`."""
    result = run_on_tmpfs(
        python_code(_PROBE), mount, fault=fault, prepare='echo old > "$M/result.json"'
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_read_only_file_system_is_named_before_writing(tmp_path):
    mount = tmp_path / "ro"
    out = _probe(mount, "read-only")
    assert out["check"][:2] == [errno.EROFS, str(mount)]
    assert out["write"][0] == errno.EROFS
    assert out["left"] == ["result.json"] and out["content"] == "old\n"


def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    mount = tmp_path / "full"
    out = _probe(mount, "full")
    # Creating a file still works on a full disk; writing its content does not.
    assert out["check"] is None
    assert out["write"][:2] == [errno.ENOSPC, str(mount / "result.json")]
    assert "No space left on device" in out["write"][2]
    # The old file intact, no temporary file left beside it.
    assert out["left"] == [".filler", "result.json"] and out["content"] == "old\n"
