"""lab/speech_eval.py: log-mel features, the classifiers' noisy training examples and white noise,
and a missing classifiers checkpoint. The phone probe runs on the real FSDD in
tests/test_train_vctk.py."""
import math

import numpy as np
import pytest
import torch

from lab import speech, speech_eval


@pytest.fixture(autouse=True)
def _single_thread(seeded_single_thread):
    yield


def test_log_mel_has_one_frame_per_code():
    fb = speech_eval.mel_filterbank(256, 8000, 40)
    assert fb.shape == (40, 129) and (fb.sum(1) > 0).all() and fb.max() <= 1
    assert speech_eval.log_mel(torch.randn(3, 8192), 8000).shape == (3, 40, 8192 // 64 + 1)


def test_white_noise_sits_the_asked_decibels_below_each_waveform():
    t = torch.arange(200_000) / 8000
    x = torch.stack([torch.sin(2 * math.pi * 440 * t), 0.1 * torch.sin(2 * math.pi * 300 * t)])  # power 0.5, 0.005
    noisy = speech_eval.add_white_noise(x, torch.tensor([[0.0], [20.0]]), torch.Generator().manual_seed(0))
    noise_power = (noisy - x).pow(2).mean(1)
    torch.testing.assert_close(noise_power, torch.tensor([0.5, 0.005 / 100]), rtol=0.01, atol=0)


def test_classifier_examples_are_noisy_crops_with_their_labels():
    clips = [np.full(300, 0.5, np.float32), np.full(100, -0.5, np.float32)]
    split = speech.Split(clips, np.array([1, 0]), ["a", "b"], np.array([7, 3]))
    features, labels = speech_eval.Classifiers.training_examples(split, np.array([1, 0]), 256, 8000,
                                                            torch.Generator().manual_seed(0), "cpu")
    assert features.shape == (2, 40, 256 // 64 + 1) and torch.isfinite(features).all()
    assert labels["speaker"].tolist() == [0, 1] and labels["digit"].tolist() == [3, 7]
    split.digit = None
    assert set(speech_eval.Classifiers.training_examples(split, np.array([0]), 256, 8000,
                                                    torch.Generator().manual_seed(0), "cpu")[1]) == {"speaker"}


def test_missing_classifiers_name_the_stage_that_trains_them(tmp_path):
    data = speech.Speech(8000, ["a", "b"], speech.Split([], np.zeros(0, np.int64), [], None), None, None)
    with pytest.raises(SystemExit, match="classifiers.pt not found: run the classifiers stage first"):
        speech_eval.Classifiers.load(tmp_path / "classifiers.pt", data, "cpu")
