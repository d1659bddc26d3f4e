"""lab/files.py: processes that write one cache at once never clash."""
import os
import subprocess
import sys
import time
from pathlib import Path

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
