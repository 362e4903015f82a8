"""Atomic writes: the target holds the old content or the new, never a partial file."""

import os

import pytest

from tfbn.files import atomic_write, atomic_write_text, save_model_atomically


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
