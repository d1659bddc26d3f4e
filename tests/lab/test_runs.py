"""The run machinery: Run.train reads metrics back only at log steps; pixel_variance is exact;
the learning-rate schedule; run_main ends a torchrun process with main's status."""
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import lab
import lab.runs

ROOT = Path(__file__).resolve().parents[2]


def test_metrics_are_read_back_once_per_log_step_and_averaged_exactly(tmp_path, monkeypatch):
    reads = []
    real_read = lab.runs.read_metrics
    monkeypatch.setattr(lab.runs, "read_metrics", lambda metrics, device: reads.append(1) or real_read(metrics, device))
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = lab.Run(tmp_path, lab.runs.Env(torch.device("cpu")), log_every=5, checkpoint_every=100)
    seen = []

    def loss_fn(m, step):
        loss = (m(torch.ones(1, 2)) ** 2).sum()
        seen.append(loss.item())
        return loss, {"loss": loss.detach(), "step_plus_half": torch.tensor(step + 0.5)}

    history = run.train("toy", model, optimizer, loss_fn, 12)
    assert len(reads) == 3 and history["step"] == [5, 10, 12]  # steps 5 and 10, and the last one
    assert history["step_plus_half"] == [4.5, 9.5, 11.5]
    assert history["loss"] == [seen[4], seen[9], seen[11]]     # float32 values, exactly


def test_pixel_variance_is_exact_and_independent_of_the_memory_layout():
    x = torch.randint(0, 256, (40, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    values = [Fraction(int(v), 255) for v in x.flatten()]
    mean = sum(values) / len(values)
    exact = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    assert lab.pixel_variance(x) == float(exact)
    assert lab.pixel_variance(x.permute(3, 1, 0, 2)) == lab.pixel_variance(x.clone()) == float(exact)


def test_cosine_learning_rate_falls_from_lr_to_zero_as_hand_computed():
    lrs = [lab.learning_rate(1e-3, "cosine", step, 4) for step in range(5)]
    # (1 + cos(pi * step / 4)) / 2 = 1, (2 + sqrt 2) / 4, 1/2, (2 - sqrt 2) / 4, 0
    expected = [1e-3, 1e-3 * (2 + 2 ** 0.5) / 4, 5e-4, 1e-3 * (2 - 2 ** 0.5) / 4, 0.0]
    assert all(abs(a - b) < 1e-18 for a, b in zip(lrs, expected))
    assert [lab.learning_rate(1e-3, "constant", step, 4) for step in range(5)] == [1e-3] * 5
    # cooldown over the last 20% of 10 steps: 1e-3 up to step 8, then 1e-3 * (10 - step) / 2
    lrs = [lab.learning_rate(1e-3, "cooldown", step, 10) for step in range(11)]
    assert lrs == pytest.approx([1e-3] * 9 + [5e-4, 0.0], rel=1e-12, abs=1e-18)
    with pytest.raises(ValueError, match="schedule"):
        lab.learning_rate(1e-3, "linear", 0, 4)


EXITING_SCRIPT = """
import atexit, sys, lab
atexit.register(lambda: print("atexit ran", flush=True))

class Finalized:
    def __del__(self):
        print("finalized", file=sys.stderr, flush=True)

kept = Finalized()  # collected when Python finalizes, which a torchrun process skips

def main():
    print("partial line", end="")  # unflushed: run_main must flush it
    if sys.argv[1] != "return":
        raise SystemExit(eval(sys.argv[1]))

lab.run_main(main)
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
