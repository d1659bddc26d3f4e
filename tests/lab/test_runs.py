"""lab/runs.py: run_main ends a torchrun process with main's status and output."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


EXITING_SCRIPT = """
import atexit, sys
from lab import runs
atexit.register(lambda: print("atexit ran", flush=True))

class Finalized:
    def __del__(self):
        print("finalized", file=sys.stderr, flush=True)

kept = Finalized()  # collected when Python finalizes, which a torchrun process skips

def main():
    print("partial line", end="")  # unflushed: run_main must flush it
    if sys.argv[1] != "return":
        raise SystemExit(eval(sys.argv[1]))

runs.run_main(main)
"""


@pytest.mark.parametrize("ending", ["return", "None", "3", "130", "'--data x: no such file'"])
def test_run_main_under_torchrun_exits_with_mains_status_and_output_but_skips_finalization(ending):
    def run(world_size):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": world_size}
        r = subprocess.run([sys.executable, "-c", EXITING_SCRIPT, ending], capture_output=True, text=True, env=env, timeout=120)
        return r.returncode, r.stdout, r.stderr
    alone, torchrun = run("1"), run("2")  # Python's own exit is the reference
    assert alone[2].endswith("finalized\n") and "finalized" not in torchrun[2]
    assert torchrun == (alone[0], alone[1], alone[2].removesuffix("finalized\n"))
    assert torchrun[:2] == ({"return": 0, "None": 0, "3": 3, "130": 130}.get(ending, 1), "partial lineatexit ran\n")
