"""train_vctk.py: readers on the real FSDD files and on synthetic VCTK layouts, resampling, crops
and features, and a few-step run of every stage. The models themselves (mu-law, WaveNet,
AudioVQVAE) are tested in test_speech_model.py.

The real data is ../shared/data/fsdd (or $VQVAE_FSDD).
"""
import json
import math
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import train_vctk
import training
import vqvae

ROOT = Path(__file__).resolve().parents[1]
FSDD = Path(os.environ.get("VQVAE_FSDD", ROOT.parent / "shared/data/fsdd"))
TINY = ["--hidden-channels", "16", "--res-channels", "8", "--num-res-layers", "1", "--embedding-dim", "8",
        "--num-embeddings", "32", "--wavenet-channels", "8", "--skip-channels", "8", "--wavenet-layers", "3",
        "--crop", "256", "--max-train-clips", "60", "--max-test-clips", "36", "--eval-clips", "6", "--wav-clips", "2",
        "--clip-seconds", "0.25", "--log-every", "1", "--seed", "3", "--prior-channels", "8", "--prior-num-layers", "3",
        "--prior-cycle", "3", "--prior-steps", "2", "--prior-batch-size", "4"]


@pytest.fixture(autouse=True)
def _single_thread(seeded_single_thread):
    yield


CACHE = {}  # the decoded-corpus cache (--data-dir) that the runs of this module share


@pytest.fixture(scope="module")
def fsdd(tmp_path_factory):
    if not (FSDD / "recordings").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"FSDD not found at {FSDD}")
        pytest.skip(f"FSDD not found at {FSDD} (set VQVAE_FSDD)")
    CACHE["dir"] = tmp_path_factory.mktemp("speech-cache")
    return FSDD


# ----------------------------------------------------------------------------- data
def test_fsdd_reader_gives_the_official_split_speakers_digits_and_alignments(fsdd):
    data = train_vctk.load_speech(fsdd, 16000)
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
    labels = train_vctk.frame_phones("0_george_0", 5, 8000, data.alignments, phones)
    assert [phones[i] for i in labels] == ["Z", "Z", "Z", "Z", "IY"]  # centres 4, 12, 20, 28, 36 ms; Z ends at 30


_write_wav = train_vctk.write_wav  # the script's own writer makes the synthetic VCTK files


def test_vctk_080_layout_is_read_resampled_to_16khz_and_split_per_speaker(tmp_path):
    t = np.arange(4800) / 48000
    for speaker, freq in [("p225", 440.0), ("p226", 1000.0)]:
        for i in range(1, 13):
            _write_wav(tmp_path / "wav48" / speaker / f"{speaker}_{i:03d}.wav", 0.5 * np.sin(2 * np.pi * freq * t), 48000)
    (tmp_path / "wav48" / "log.txt").write_text("not a speaker")
    data = train_vctk.load_speech(tmp_path, 16000)
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
    y = train_vctk.resample(x.astype(np.float32), orig, new)
    assert y.dtype == np.float32 and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, atol=2e-6 * max(1, np.abs(x).sum() / 100))


def test_decoded_corpus_is_cached_by_content_and_settings(tmp_path, capsys):
    t = np.arange(4800) / 48000
    for i in range(1, 11):
        _write_wav(tmp_path / "vctk" / "wav48" / "p225" / f"p225_{i:03d}.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 48000)
    cache = tmp_path / "cache"
    first = train_vctk.load_speech(tmp_path / "vctk", 16000, data_dir=cache)
    again = train_vctk.load_speech(tmp_path / "vctk", 16000, data_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1 and again.test.names == first.test.names == ["p225_010"]
    assert all(np.array_equal(a, b) for a, b in zip(first.train.audio, again.train.audio))
    assert train_vctk.load_speech(tmp_path / "vctk", 8000, data_dir=cache).sample_rate == 8000  # other settings
    _write_wav(tmp_path / "vctk" / "wav48" / "p225" / "p225_001.wav", np.zeros(480), 48000)   # content changed
    assert len(train_vctk.load_speech(tmp_path / "vctk", 16000, data_dir=cache).train.audio[0]) == 160
    assert len(list(cache.glob("*.npz"))) == 3
    for npz in cache.glob("*.npz"):
        npz.write_bytes(b"broken")
    assert len(train_vctk.load_speech(tmp_path / "vctk", 16000, data_dir=cache).train.audio) == 9
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
    data = train_vctk.load_speech(tmp_path, 16000)
    assert data.speakers == ["p226"] and data.test.names == ["p226_010_mic1"] and len(data.train.audio) == 9
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(1600) / 16000)
    assert np.abs(data.train.audio[0] - expected)[50:-50].max() < 2e-3
    soundfile.write(str(tmp_path / "deep.wav"), tone, 48000, subtype="PCM_24")
    x, rate = train_vctk.read_wav(tmp_path / "deep.wav")
    assert rate == 48000 and np.abs(x - tone).max() < 1e-6


def test_resampling_removes_what_the_new_rate_cannot_hold():
    t = np.arange(48000) / 48000
    for freq, gain in [(1000.0, 1.0), (6000.0, 1.0), (10000.0, 0.0)]:  # 10 kHz would alias at 16 kHz
        y = train_vctk.resample(np.sin(2 * np.pi * freq * t), 48000, 16000)
        assert len(y) == 16000
        assert np.sqrt(2 * np.mean(y[500:-500] ** 2)) == pytest.approx(gain, abs=0.01), freq
    up = train_vctk.resample(np.sin(2 * np.pi * 440 * np.arange(8000) / 8000), 8000, 16000)
    assert len(up) == 16000 and np.abs(up - np.sin(2 * np.pi * 440 * np.arange(16000) / 16000))[500:-500].max() < 1e-3


def test_vctk_092_flac_without_soundfile_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "wav48_silence_trimmed" / "p225").mkdir(parents=True)
    for i in range(1, 11):
        (tmp_path / "wav48_silence_trimmed" / "p225" / f"p225_{i:03d}_mic1.flac").write_bytes(b"fLaC")
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile raises ImportError
    with pytest.raises(train_vctk.DataError, match="pip install soundfile"):
        train_vctk.load_speech(tmp_path, 16000)


def test_unknown_layout_names_the_expected_folders(tmp_path):
    with pytest.raises(train_vctk.DataError, match="recordings/ .*wav48/"):
        train_vctk.load_speech(tmp_path, 16000)


def test_random_crops_are_seeded_and_place_short_clips_inside_silence():
    clips = [np.arange(1, 11, dtype=np.float32), np.arange(1, 101, dtype=np.float32)]
    a = train_vctk.random_crops(clips, 32, torch.Generator().manual_seed(1))
    assert torch.equal(a, train_vctk.random_crops(clips, 32, torch.Generator().manual_seed(1)))
    assert a.shape == (2, 32) and (a[0] > 0).sum() == 10 and a[0][a[0] > 0].tolist() == list(range(1, 11))
    assert (a[1][1:] - a[1][:-1] == 1).all()  # a contiguous window of the long clip


def test_log_mel_has_one_frame_per_code():
    fb = train_vctk.mel_filterbank(256, 8000, 40)
    assert fb.shape == (40, 129) and (fb.sum(1) > 0).all() and fb.max() <= 1
    assert train_vctk.log_mel(torch.randn(3, 8192), 8000).shape == (3, 40, 8192 // 64 + 1)


def test_white_noise_sits_the_asked_decibels_below_each_waveform():
    t = torch.arange(200_000) / 8000
    x = torch.stack([torch.sin(2 * math.pi * 440 * t), 0.1 * torch.sin(2 * math.pi * 300 * t)])  # power 0.5, 0.005
    noisy = train_vctk.add_white_noise(x, torch.tensor([[0.0], [20.0]]), torch.Generator().manual_seed(0))
    noise_power = (noisy - x).pow(2).mean(1)
    torch.testing.assert_close(noise_power, torch.tensor([0.5, 0.005 / 100]), rtol=0.01, atol=0)


# ----------------------------------------------------------------------------- the script
def test_help_lists_every_option_of_the_presets_with_each_presets_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_vctk.parse_args(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    for flag, values in [("--hidden-channels", "quick 64, paper 256, long 64"),
                         ("--commitment-cost", "quick 0.25, paper 0.25, long 0.25"),
                         ("--prior-num-layers", "quick 12, paper 20, long 12"),
                         ("--prior-lr", "quick 0.001, paper 0.001, long 0.001"),
                         ("--steps", "quick 3000, paper 200000, long 12000")]:
        assert flag in shown and f"[{values}]" in shown, flag
    args = train_vctk.parse_args(["--preset", "long", "--prior-num-layers", "5"])
    assert (args.steps, args.prior_num_layers, args.prior_lr, args.hidden_channels) == (12_000, 5, 1e-3, 64)


def run(out, *extra):
    train_vctk.main(["--data", str(FSDD), "--data-dir", str(CACHE["dir"]), "--out", str(out), *TINY, *extra])
    return out


def test_all_stages_write_checkpoints_metrics_audio_and_figures(tmp_path, fsdd):
    out = run(tmp_path / "run", "--steps", "3", "--clf-steps", "2")
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["num_eval_clips"] == 6 and 0 < m["test_recon_nats_per_sample"] < 6
    for key in ["real_test_speaker_accuracy", "real_test_digit_accuracy", "real_test_digit_accuracy_10db",
                "reconstruction_speaker_accuracy",
                "conversion_target_speaker_rate", "conversion_digit_kept_rate", "phone_accuracy",
                "phone_majority_accuracy", "phone_accuracy_random_encoder", "phone_accuracy_random_encoder_kmeans",
                "prior_sample_speaker_rate", "prior_sample_digit_confidence", "real_test_digit_confidence"]:
        assert 0 <= m[key] <= 1, key
    assert 0 < m["prior_test_bits_per_code"] < 12 and 0 < m["unigram_test_bits_per_code"] < 12
    assert m["num_prior_samples"] == 6
    for name in ["reconstructions", "conversion", "code_phone", "vqvae_curves", "prior_samples", "prior_curves"]:
        assert (out / f"{name}.png").stat().st_size > 1000, name
    wavs = sorted((out / "audio").glob("*.wav"))
    assert len(wavs) == 8 and sum("_as_" in w.name for w in wavs) == 2 and sum("prior_" in w.name for w in wavs) == 2
    with wave.open(str(wavs[0])) as w:
        assert w.getframerate() == 8000 and w.getnframes() > 100
    assert len(training.load_checkpoint(out / "vqvae.pt")["history"]["step"]) == 3
    # The one loader of any run restores the speech models, their weights as saved.
    model, prior = training.load_run(out)
    assert isinstance(model, vqvae.AudioVQVAE) and isinstance(prior, vqvae.WaveNet) and not prior.training
    saved = training.load_checkpoint(out / "prior.pt")
    assert saved["model_class"] == "WaveNet" and prior.config.num_classes == model.config.num_embeddings
    assert all(torch.equal(v, saved["model"][k]) for k, v in prior.state_dict().items())


def test_resumed_run_repeats_uninterrupted_losses_and_refuses_to_overwrite(tmp_path, fsdd):
    full = run(tmp_path / "full", "--steps", "4", "--stages", "vqvae")
    part = run(tmp_path / "part", "--steps", "2", "--stages", "vqvae")
    with pytest.raises(SystemExit, match="--resume"):
        run(part, "--steps", "4", "--stages", "vqvae")
    run(part, "--steps", "4", "--stages", "vqvae", "--resume")
    a, b = training.load_checkpoint(full / "vqvae.pt"), training.load_checkpoint(part / "vqvae.pt")
    assert a["history"] == b["history"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_cosine_schedule_sets_the_learning_rate_from_the_step(tmp_path, fsdd):
    out = run(tmp_path / "cos", "--steps", "3", "--stages", "vqvae", "--lr", "1e-3", "--lr-schedule", "cosine")
    # the last step taken is step 2 of 3: lr = 1e-3 * (1 + cos(2 pi / 3)) / 2 = 2.5e-4
    lr = training.load_checkpoint(out / "vqvae.pt")["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(2.5e-4, rel=1e-12)


def test_torchrun_two_processes_train_every_stage_and_evaluate_on_rank_0(tmp_path, fsdd):
    # Evaluation runs on rank 0 alone after the others have left: nothing in it may wait for them
    # (the random-encoder probe's k-means once broadcast in the process group and crashed here).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_vctk.py"), "--data", str(fsdd), "--data-dir", str(CACHE["dir"]), "--out", str(tmp_path / "ddp"),
           *TINY,
           "--steps", "2", "--clf-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "codebook identical on all 2 processes" in result.stdout
    report = json.loads((tmp_path / "ddp/metrics.json").read_text())
    assert report["world_size"] == 2 and 0 <= report["metrics"]["phone_accuracy_random_encoder_kmeans"] <= 1


def test_prior_of_an_earlier_vqvae_is_refused(tmp_path, fsdd):
    out = run(tmp_path / "stale", "--steps", "2", "--stages", "vqvae,prior")
    assert training.load_checkpoint(out / "prior.pt")["vqvae_id"].startswith("step 2, sha256 ")
    run(out, "--steps", "3", "--stages", "vqvae", "--resume")
    with pytest.raises(SystemExit, match="delete prior.pt"):
        run(out, "--steps", "3", "--stages", "prior", "--resume")
