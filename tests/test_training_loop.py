"""training.run_loop on a toy model: metrics leave the device only at log steps."""
import torch

import training


def test_metrics_are_read_back_once_per_log_step_and_averaged_exactly(tmp_path, monkeypatch):
    reads = []
    real_read = training.read_metrics
    monkeypatch.setattr(training, "read_metrics", lambda metrics, device: reads.append(1) or real_read(metrics, device))
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = type("Args", (), {"resume": False, "log_every": 5, "checkpoint_every": 100})()
    seen = []

    def loss_fn(m, step):
        loss = (m(torch.ones(1, 2)) ** 2).sum()
        seen.append(loss.item())
        return loss, {"loss": loss.detach(), "step_plus_half": torch.tensor(step + 0.5)}

    history = training.run_loop("toy", model, optimizer, loss_fn, tmp_path / "toy.pt", 12, args,
                                training.Env(torch.device("cpu")), {})
    assert len(reads) == 3 and history["step"] == [5, 10, 12]  # steps 5 and 10, and the last one
    assert history["step_plus_half"] == [4.5, 9.5, 11.5]
    assert history["loss"] == [seen[4], seen[9], seen[11]]     # float32 values, exactly
