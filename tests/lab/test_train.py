"""The training loop of lab/train.py: metrics read back at log steps only, the learning-rate
schedule, the stop on a non-finite loss with the last good checkpoint kept, and a diverged run
resumed from it with a lower learning rate."""
import math

import pytest
import torch

from lab import files, runs, train


def test_metrics_are_read_back_once_per_log_step_and_averaged_exactly(tmp_path, monkeypatch):
    reads = []
    real_read = runs.read_metrics
    monkeypatch.setattr(train, "read_metrics", lambda metrics, device: reads.append(1) or real_read(metrics, device))
    model = torch.nn.Linear(2, 1)
    run = runs.Run(tmp_path, torch.device("cpu"), log_every=5, checkpoint_every=100)
    seen = []

    def loss_fn(m, step):
        loss = (m(torch.ones(1, 2)) ** 2).sum()
        seen.append(loss.item())
        return loss, {"loss": loss.detach(), "step_plus_half": torch.tensor(step + 0.5)}

    history = train.fit(run, "toy", model, loss_fn, 12, lr=0.1)
    assert len(reads) == 3 and history["step"] == [5, 10, 12]  # steps 5 and 10, and the last one
    assert history["step_plus_half"] == [4.5, 9.5, 11.5]
    assert history["loss"] == [seen[4], seen[9], seen[11]]     # float32 values, exactly


def test_cosine_learning_rate_falls_from_lr_to_zero_as_hand_computed():
    lrs = [train.learning_rate(1e-3, "cosine", step, 4) for step in range(5)]
    # (1 + cos(pi * step / 4)) / 2 = 1, (2 + sqrt 2) / 4, 1/2, (2 - sqrt 2) / 4, 0
    expected = [1e-3, 1e-3 * (2 + 2 ** 0.5) / 4, 5e-4, 1e-3 * (2 - 2 ** 0.5) / 4, 0.0]
    assert all(abs(a - b) < 1e-18 for a, b in zip(lrs, expected))
    assert [train.learning_rate(1e-3, "constant", step, 4) for step in range(5)] == [1e-3] * 5
    # cooldown over the last 20% of 10 steps: 1e-3 up to step 8, then 1e-3 * (10 - step) / 2
    lrs = [train.learning_rate(1e-3, "cooldown", step, 10) for step in range(11)]
    assert lrs == pytest.approx([1e-3] * 9 + [5e-4, 0.0], rel=1e-12, abs=1e-18)
    with pytest.raises(ValueError, match="schedule"):
        train.learning_rate(1e-3, "linear", 0, 4)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 1)
    run = runs.Run(tmp_path, torch.device("cpu"), log_every=1, checkpoint_every=2)

    def loss_fn(m, step):
        loss = m(torch.ones(1, 2)).sum() * (math.inf if step == 3 else 1.0)
        return loss, {"loss": loss.item()}

    path = tmp_path / "toy.pt"
    with pytest.raises(SystemExit, match=rf"step 4: the loss or a gradient is not finite; stopped without saving. "
                                         rf"Last good checkpoint: {path} \(step 2\)"):
        train.fit(run, "toy", model, loss_fn, 10, lr=0.1)
    state = files.load_checkpoint(path)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not list(tmp_path.glob("*.tmp*"))


def test_diverged_run_keeps_a_finite_checkpoint_and_resumes_from_it_with_a_lower_lr(tmp_path):
    def fit(lr, resume):
        model = torch.nn.Linear(2, 1)
        torch.nn.init.constant_(model.weight, 0.5)
        run = runs.Run(tmp_path, torch.device("cpu"), resume=resume, log_every=1, checkpoint_every=2,
                       options={"lr": lr, "world_size": 1}, resumable={"steps"})

        def loss_fn(m, step):   # diverges at the 4th step while the learning rate is large
            loss = (m(torch.ones(1, 2)) ** 2).sum() * (math.inf if step == 3 and lr > 0.05 else 1.0)
            return loss, {"loss": loss.detach()}
        return train.fit(run, "toy", model, loss_fn, 6, lr)

    with pytest.raises(SystemExit, match=r"step 4: the loss or a gradient is not finite; .*\(step 2\)"):
        fit(0.1, resume=False)
    with pytest.raises(SystemExit, match=r"--lr 0.1 \(now 0.2\)"):
        fit(0.2, resume=True)            # a higher rate is another run
    history = fit(0.01, resume=True)
    state = files.load_checkpoint(tmp_path / "toy.pt")
    assert history["step"] == [1, 2, 3, 4, 5, 6] and state["resumed"] == [{"step": 2, "lr": (0.1, 0.01)}]
    assert all(math.isfinite(v) for v in history["loss"])
