"""The guards of lab/guards.py: the lock on --out (a script refuses a second run before any work),
and the resume check of a learning-rate schedule; the guards met through a script's options and
files are tested in tests/test_bad_input.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_cifar
from lab import guards


def test_a_prior_schedule_fixes_the_prior_steps_only():
    saved = {"lr_schedule": "constant", "steps": 2, "prior_lr_schedule": "cooldown", "prior_steps": 6, "world_size": 1}

    def check(path, saved, now):
        return guards.check_resume(path, saved, now, resumable={"steps", "prior_steps"})
    check(Path("vqvae.pt"), saved, {**saved, "steps": 3})   # the VQ-VAE may lengthen
    with pytest.raises(SystemExit, match=r"--prior-steps 6 \(now 7\) \(the --prior-lr-schedule cooldown rates "
                                         r"depend on --prior-steps\)"):
        check(Path("prior.pt"), saved, {**saved, "prior_steps": 7})
    constant = {**saved, "prior_lr_schedule": "constant"}
    check(Path("prior.pt"), constant, {**constant, "prior_steps": 7})


def test_second_run_on_the_same_out_is_refused_while_the_first_lives(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(SystemExit, match=rf"another run \(process {sleeper.pid}\) is using this folder"):
            train_cifar.main(["--out", str(out), "--data", str(tmp_path / "missing")])
    finally:
        sleeper.kill()
        sleeper.wait()
    guards.lock_out(out)  # its process has ended: the lock is taken over
    assert (out / ".lock").read_text() == str(os.getpid())
