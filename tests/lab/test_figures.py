"""lab/figures.py and the figures of lab/speech_eval.py: what has nothing to draw draws nothing
instead of failing after the work (a history without points, an empty selection of clips)."""
import torch

from lab import figures, speech_eval


def test_a_history_without_points_or_keys_draws_nothing(tmp_path):
    figures.plot_history(tmp_path / "a.png", {"step": []}, ["loss"])
    figures.plot_history(tmp_path / "b.png", None, ["loss"])
    figures.plot_history(tmp_path / "c.png", {"step": [1, 2], "loss": [1.0, 0.5]}, ["recon_loss"])
    figures.training_curves(tmp_path, {"vqvae": {"step": []}}, {"vqvae": "VQ-VAE"})
    assert not list(tmp_path.iterdir())
    figures.plot_history(tmp_path / "d.png", {"step": [1, 2], "loss": [1.0, 0.5]}, ["loss", "recon_loss"])
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_no_clip_to_show_draws_no_spectrogram(tmp_path):
    speech_eval.plot_spectrograms(tmp_path / "none.png", [], 8000, "nothing")
    assert not (tmp_path / "none.png").exists()
    speech_eval.plot_spectrograms(tmp_path / "one.png", [("clip", [("original", torch.randn(4000))])], 8000, "one")
    assert (tmp_path / "one.png").exists()
