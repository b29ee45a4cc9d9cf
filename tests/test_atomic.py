"""Atomic writes keep the umask's permissions: results folders stay readable for colleagues."""

import os
import stat
import tempfile

from hsd_exp.atomic import publish, umask_mode


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
