"""Atomic writes keep the umask's permissions (results folders stay readable for colleagues) and are whole or absent."""

import os
import stat
import tempfile

import pytest

from hsd_exp.atomic import atomic_file, publish, umask_mode, write_atomic


def test_a_published_temp_file_and_folder_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        fd, tmp = tempfile.mkstemp(dir=tmp_path)
        os.close(fd)
        assert stat.S_IMODE(os.stat(publish(tmp, tmp_path / "metrics.json")).st_mode) == 0o644
        folder = tempfile.mkdtemp(dir=tmp_path)
        assert stat.S_IMODE(os.stat(publish(folder, tmp_path / "model")).st_mode) == 0o755
        os.umask(0o077)  # a private umask stays private
        assert umask_mode() == 0o600 and umask_mode(directory=True) == 0o700
    finally:
        os.umask(old)


def test_an_atomic_write_replaces_whole_and_a_failed_one_leaves_the_old_file(tmp_path):
    path = write_atomic(tmp_path / "sub" / "run.json", "first\n")  # the folder is made
    assert path.read_text() == "first\n"
    write_atomic(path, b"second\n")
    assert path.read_bytes() == b"second\n"
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of a third")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "second\n"  # never half of one
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no temp file left behind
