"""lab/files.py: processes that write one cache at once never clash; a full disk is one line."""
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import files


def test_processes_making_the_same_cache_at_once_do_not_clash(tmp_path):
    # torchrun's processes all decode a missing data cache and save it: each through its own
    # temporary file, so that no rename finds its file taken by the other process.
    code = ("import sys, time, numpy as np; from lab import files; from pathlib import Path\n"
            "time.sleep(max(0, float(sys.argv[2]) - time.time()))  # start together, after the imports\n"
            "for i in range(200): files.save_npz(Path(sys.argv[1]), {'x': np.full(10_000, i)})")
    env = {**os.environ, "PYTHONPATH": str(Path(files.__file__).parents[1])}
    start = str(time.time() + 6)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache.npz"), start], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert files.load_npz(tmp_path / "cache.npz", keys=("x",))["x"][0] == 199
    assert [f.name for f in tmp_path.iterdir()] == ["cache.npz"]


def test_a_full_disk_ends_the_run_in_one_line_naming_the_file_and_what_was_kept(tmp_path):
    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")
    path = tmp_path / "metrics.json"
    with pytest.raises(SystemExit, match=rf"no space left on the device of {tmp_path}: writing metrics.json failed "
                                         r"and it was not written; free some space"):
        files.write_atomically(path, full)
    files.write_json(path, {"a": 1})
    with pytest.raises(SystemExit, match=r"writing metrics.json failed and the earlier metrics.json is kept"):
        files.write_atomically(path, full)
    assert path.read_text() == '{\n  "a": 1\n}\n' and [f.name for f in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(PermissionError):   # other failures are not a full disk
        files.write_atomically(path, lambda tmp: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
