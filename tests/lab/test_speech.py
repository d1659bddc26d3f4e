"""lab/speech.py: the readers on the real FSDD files and on synthetic VCTK layouts, the decoded
corpus cache, resampling, crops and subsets. The speech models (mu-law, WaveNet, AudioVQVAE) are
tested in test_speech_model.py, the script in test_train_vctk.py.

The real data is ../shared/data/fsdd (or $VQVAE_FSDD).
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import files, speech, speech_eval

ROOT = Path(__file__).resolve().parents[2]
FSDD = Path(os.environ.get("VQVAE_FSDD", ROOT.parent / "shared/data/fsdd"))


@pytest.fixture(autouse=True)
def _single_thread(seeded_single_thread):
    yield


@pytest.fixture(scope="module")
def fsdd():
    if not (FSDD / "recordings").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"FSDD not found at {FSDD}")
        pytest.skip(f"FSDD not found at {FSDD} (set VQVAE_FSDD)")
    return FSDD


# ----------------------------------------------------------------------------- data
def test_fsdd_reader_gives_the_official_split_speakers_digits_and_alignments(fsdd):
    data = speech.load_speech(fsdd, 16000)
    assert data.sample_rate == 8000 and len(data.speakers) == 6 and "george" in data.speakers
    assert len(data.train.audio) == 2700 and len(data.test.audio) == 300
    assert all(int(n.split("_")[2]) < 5 for n in data.test.names)
    assert np.array_equal(np.bincount(data.test.digit), np.full(10, 30))
    assert np.array_equal(np.bincount(data.train.speaker), np.full(6, 450))
    i = data.test.names.index("0_george_0")
    assert data.test.digit[i] == 0 and data.speakers[data.test.speaker[i]] == "george"
    assert 0.01 < np.abs(data.test.audio[i]).max() <= 1 and data.test.audio[i].dtype == np.float32
    assert len(data.alignments) == 2985 and data.alignments["0_george_0"][0] == ("Z", 0.0, 0.03)
    phones = sorted({p for segments in data.alignments.values() for p, _, _ in segments})
    assert len(phones) == 20 and "SIL" in phones
    labels = speech_eval.frame_phones("0_george_0", 5, 8000, data.alignments, phones)
    assert [phones[i] for i in labels] == ["Z", "Z", "Z", "Z", "IY"]  # centres 4, 12, 20, 28, 36 ms; Z ends at 30


_write_wav = speech.write_wav  # the package's own writer makes the synthetic VCTK files


def test_vctk_080_layout_is_read_resampled_to_16khz_and_split_per_speaker(tmp_path):
    t = np.arange(4800) / 48000
    for speaker, freq in [("p225", 440.0), ("p226", 1000.0)]:
        for i in range(1, 13):
            _write_wav(tmp_path / "wav48" / speaker / f"{speaker}_{i:03d}.wav", 0.5 * np.sin(2 * np.pi * freq * t), 48000)
    (tmp_path / "wav48" / "log.txt").write_text("not a speaker")
    data = speech.load_speech(tmp_path, 16000)
    assert data.sample_rate == 16000 and data.speakers == ["p225", "p226"] and data.train.digit is None
    assert data.test.names == ["p225_010", "p226_010"] and len(data.train.audio) == 22
    x = data.train.audio[-1]
    assert len(x) == 1600 and data.speakers[data.train.speaker[-1]] == "p226"
    expected = 0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(1600) / 16000)
    assert np.abs(x - expected)[50:-50].max() < 2e-3  # away from the edges, the tone is kept


@pytest.mark.parametrize("orig, new", [(48000, 16000), (44100, 16000), (8000, 16000), (16000, 22050), (48000, 7000)])
@pytest.mark.parametrize("n", [1, 5, 999])
def test_polyphase_resampler_equals_the_windowed_sinc_evaluated_at_each_output_instant(orig, new, n):
    # Reference: every output sample computed on its own in float64, y(t) = sum_i x_i h(t - i) at
    # t = n_out * orig / new, with h the Hann-windowed sinc of half-width W = ceil(16 / c).
    x = np.random.default_rng(n).standard_normal(n)
    cutoff = min(1.0, new / orig)
    width = math.ceil(16 / cutoff)
    t = np.arange(math.ceil(n * new / orig)) * orig / new
    d = t[:, None] - np.arange(n)[None]                                       # (n_out, n)
    h = cutoff * np.sinc(cutoff * d) * (0.5 + 0.5 * np.cos(np.pi * np.clip(d / width, -1, 1)))
    expected = (np.where(np.abs(d) < width, h, 0) * x).sum(1)
    y = speech.resample(x.astype(np.float32), orig, new)
    assert y.dtype == np.float32 and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, atol=2e-6 * max(1, np.abs(x).sum() / 100))


def test_decoded_corpus_is_cached_by_content_and_settings(tmp_path, capsys):
    t = np.arange(4800) / 48000
    for i in range(1, 11):
        _write_wav(tmp_path / "vctk" / "wav48" / "p225" / f"p225_{i:03d}.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 48000)
    cache = tmp_path / "cache"
    first = speech.load_speech(tmp_path / "vctk", 16000, data_dir=cache)
    again = speech.load_speech(tmp_path / "vctk", 16000, data_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1 and again.test.names == first.test.names == ["p225_010"]
    assert all(np.array_equal(a, b) for a, b in zip(first.train.audio, again.train.audio))
    assert speech.load_speech(tmp_path / "vctk", 8000, data_dir=cache).sample_rate == 8000  # other settings
    _write_wav(tmp_path / "vctk" / "wav48" / "p225" / "p225_001.wav", np.zeros(480), 48000)   # content changed
    assert len(speech.load_speech(tmp_path / "vctk", 16000, data_dir=cache).train.audio[0]) == 160
    assert len(list(cache.glob("*.npz"))) == 3
    for npz in cache.glob("*.npz"):
        npz.write_bytes(b"broken")
    assert len(speech.load_speech(tmp_path / "vctk", 16000, data_dir=cache).train.audio) == 9
    assert "unreadable cache" in capsys.readouterr().out


def soundfile_or_skip():
    if os.environ.get("CI"):
        import soundfile  # CI installs it: a missing soundfile fails there
        return soundfile
    return pytest.importorskip("soundfile", reason="the optional soundfile package is not installed")


def test_vctk_092_flac_and_24_bit_wav_are_read_through_soundfile(tmp_path):
    soundfile = soundfile_or_skip()
    t = np.arange(4800) / 48000
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    for i in range(1, 11):
        path = tmp_path / "wav48_silence_trimmed" / "p226" / f"p226_{i:03d}_mic1.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), tone, 48000, subtype="PCM_16")
    data = speech.load_speech(tmp_path, 16000)
    assert data.speakers == ["p226"] and data.test.names == ["p226_010_mic1"] and len(data.train.audio) == 9
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(1600) / 16000)
    assert np.abs(data.train.audio[0] - expected)[50:-50].max() < 2e-3
    soundfile.write(str(tmp_path / "deep.wav"), tone, 48000, subtype="PCM_24")
    x, rate = speech.read_wav(tmp_path / "deep.wav")
    assert rate == 48000 and np.abs(x - tone).max() < 1e-6


def test_resampling_removes_what_the_new_rate_cannot_hold():
    t = np.arange(48000) / 48000
    for freq, gain in [(1000.0, 1.0), (6000.0, 1.0), (10000.0, 0.0)]:  # 10 kHz would alias at 16 kHz
        y = speech.resample(np.sin(2 * np.pi * freq * t), 48000, 16000)
        assert len(y) == 16000
        assert np.sqrt(2 * np.mean(y[500:-500] ** 2)) == pytest.approx(gain, abs=0.01), freq
    up = speech.resample(np.sin(2 * np.pi * 440 * np.arange(8000) / 8000), 8000, 16000)
    assert len(up) == 16000 and np.abs(up - np.sin(2 * np.pi * 440 * np.arange(16000) / 16000))[500:-500].max() < 1e-3


def test_vctk_092_flac_without_soundfile_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "wav48_silence_trimmed" / "p225").mkdir(parents=True)
    for i in range(1, 11):
        (tmp_path / "wav48_silence_trimmed" / "p225" / f"p225_{i:03d}_mic1.flac").write_bytes(b"fLaC")
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile raises ImportError
    with pytest.raises(files.DataError, match="pip install soundfile"):
        speech.load_speech(tmp_path, 16000)


def test_unknown_layout_names_the_expected_folders(tmp_path):
    with pytest.raises(files.DataError, match="recordings/ .*wav48/"):
        speech.load_speech(tmp_path, 16000)


def test_random_crops_are_seeded_and_place_short_clips_inside_silence():
    clips = speech.Split([np.arange(1, 11, dtype=np.float32), np.arange(1, 101, dtype=np.float32)],
                         np.zeros(2, np.int64), ["short", "long"], None)
    a = clips.random_crops([0, 1], 32, torch.Generator().manual_seed(1))
    assert torch.equal(a, clips.random_crops([0, 1], 32, torch.Generator().manual_seed(1)))
    assert a.shape == (2, 32) and (a[0] > 0).sum() == 10 and a[0][a[0] > 0].tolist() == list(range(1, 11))
    assert (a[1][1:] - a[1][:-1] == 1).all()  # a contiguous window of the long clip


def test_subsets_are_seeded_and_keep_the_corpus_order(fsdd):
    full = speech.load_speech(fsdd, 16000)
    part = speech.load_speech(fsdd, 16000, max_train=60, max_test=36, seed=3)
    assert len(part.train.audio) == 60 and len(part.test.audio) == 36
    idx = [full.train.names.index(n) for n in part.train.names]
    assert idx == sorted(idx) and np.array_equal(part.train.speaker, full.train.speaker[idx])
    assert all(np.array_equal(a, full.train.audio[i]) for a, i in zip(part.train.audio, idx))
    assert speech.load_speech(fsdd, 16000, max_train=60, max_test=36, seed=3).test.names == part.test.names


# ----------------------------------------------------------------------------- classifiers
