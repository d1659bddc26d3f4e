"""The training loop of lab/train.py: metrics read back at log steps only, the learning-rate
schedule, the stop on a non-finite or exploding loss with the last good checkpoint kept, a diverged
run resumed from it with a lower learning rate, and Ctrl-C during a step that does not end."""
import math
import os
import signal
import time

import pytest
import torch

from lab import files, runs, train


def test_metrics_are_read_back_once_per_log_step_and_averaged_exactly(tmp_path, monkeypatch):
    reads = []
    real_read = runs.read_metrics
    monkeypatch.setattr(train, "read_metrics", lambda metrics, device: reads.append(sorted(metrics)) or real_read(metrics, device))
    model = torch.nn.Linear(2, 1)
    run = runs.Run(tmp_path, torch.device("cpu"), log_every=5, checkpoint_every=100)
    seen = []

    def loss_fn(m, step):
        loss = (m(torch.ones(1, 2)) ** 2).sum()
        seen.append(loss.item())
        return loss, {"loss": loss.detach(), "step_plus_half": torch.tensor(step + 0.5)}

    history = train.fit(run, "toy", model, loss_fn, 12, lr=0.1)
    # steps 5 and 10 and the last, and at the checkpoint (the last step) its loss on the next batch
    assert reads == [["_bad", "loss", "step_plus_half"]] * 3 + [["first", "next"]] and history["step"] == [5, 10, 12]
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


def test_an_exploding_loss_keeps_the_last_good_checkpoint_and_a_lower_lr_goes_on_from_it(tmp_path):
    """Finite weights whose loss on the next batch is a million times the first are not good: the
    step-2 checkpoint stays the last good one, and --resume with a lower --lr continues from it."""
    def fit(lr, resume):
        model = torch.nn.Linear(2, 1)
        torch.nn.init.constant_(model.weight, 0.5)
        run = runs.Run(tmp_path, torch.device("cpu"), resume=resume, log_every=1, checkpoint_every=2,
                       options={"lr": lr, "world_size": 1}, resumable={"steps"})

        def loss_fn(m, step):   # from step 3 on the loss is sent off (finite: the gradients' norm stays finite)
            loss = (m(torch.ones(1, 2)) ** 2).sum() * (1e6 if step >= 3 and lr > 0.05 else 1.0)
            return loss, {"loss": loss.detach()}
        return train.fit(run, "toy", model, loss_fn, 6, lr)

    path = tmp_path / "toy.pt"
    with pytest.raises(SystemExit, match=rf"step 4: the loss is exploding \(.* on the next batch, over 10x the first "
                                         rf"step's .*\); stopped without saving. Last good checkpoint: {path} \(step 2\): "
                                         r"--resume with a lower --lr continues from it"):
        fit(0.1, resume=False)
    assert files.load_checkpoint(path)["step"] == 2
    assert fit(0.01, resume=True)["step"] == [1, 2, 3, 4, 5, 6]


def test_a_step_that_does_not_end_soon_after_ctrl_c_is_stopped_at_once(tmp_path, monkeypatch):
    """One Ctrl-C stops after the step; a step still running StopRequest.GRACE seconds later (a huge
    codebook's) is stopped where it is: no checkpoint of it, the earlier ones kept."""
    monkeypatch.setattr(train.StopRequest, "GRACE", 1)
    handler = signal.getsignal(signal.SIGINT)   # ignored where the tests run in the background (`&`)
    model, ended = torch.nn.Linear(2, 1), []
    run = runs.Run(tmp_path, torch.device("cpu"), checkpoint_every=1)

    def loss_fn(m, step):
        if step == 2 and m.training:  # the third training step (not the check of checkpoint 2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)            # interrupted by the alarm, a second after Ctrl-C
            ended.append(step)
        loss = (m(torch.ones(1, 2)) ** 2).sum()
        return loss, {"loss": loss.detach()}
    with pytest.raises(KeyboardInterrupt):
        train.fit(run, "toy", model, loss_fn, 10, lr=0.1)
    assert not ended and files.load_checkpoint(tmp_path / "toy.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is handler and signal.alarm(0) == 0
