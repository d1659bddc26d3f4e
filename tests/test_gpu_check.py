"""benchmarks/gpu_check.py, the GPU acceptance command, run here with --device cpu --quick so that
its code is tested where no GPU is: every check must run and pass, and the report must say so."""
import json
import os
import subprocess
import sys

import pytest

from conftest import CIFAR, ROOT, require_extension


def test_gpu_check_runs_every_check_on_the_cpu(tmp_path, data_dir):
    require_extension()
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu", "--quick",
                          "--out", str(out), "--data", str(CIFAR), "--data-dir", str(data_dir)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["passed"] and "ALL PASSED" in run.stdout
    checks = ["build", "nearest", "ema_stats", "sanitizer", "speed", "train", "compile"]
    assert all(report[name]["passed"] for name in checks)
    assert report["build"]["quantizer backend"] == "extension: CPU"
    assert len(report["nearest"]["wrong rows"]) >= 10 and not any(report["nearest"]["wrong rows"].values())
    train = report["train"]
    assert train["extension"]["backend"] == "extension: CPU" and train["PyTorch"]["backend"] == "PyTorch"
    assert train["extension"]["final loss"] == pytest.approx(train["PyTorch"]["final loss"], rel=0.05)
