"""lab/runs.py: run_main ends a torchrun process with main's status and output."""
import os
import signal
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


STOPPED_SCRIPT = """
import sys, time
from pathlib import Path
from lab import guards, runs

def main():
    guards.lock_out(Path(sys.argv[1]))
    print("ready", flush=True)
    if sys.argv[2] == "ctrl-c":
        raise KeyboardInterrupt   # as Ctrl-C outside a training loop, or in a step that did not end
    time.sleep(60)

runs.run_main(main)
"""


@pytest.mark.parametrize("how", ["ctrl-c", "SIGHUP", "SIGTERM"])
def test_a_stopped_run_ends_in_one_line_with_status_130_and_frees_its_lock(how, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", STOPPED_SCRIPT, str(out), how], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline() == "ready\n"
    if how != "ctrl-c":
        process.send_signal(getattr(signal, how))   # a closed terminal, or a scheduler's stop
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip().splitlines() == [
        "stopped (Ctrl-C, SIGTERM or SIGHUP): the checkpoints written so far are kept; continue with --resume"]
    assert not (out / ".lock").exists()
