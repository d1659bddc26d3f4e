"""train_vctk.py: its options, and few-step runs of every stage (checkpoints, metrics, audio and
figures; exact resume; the learning-rate schedule; torchrun; a stale prior refused). The data
readers, features and classifiers of lab/speech.py and lab/speech_eval.py are tested in tests/lab/test_speech.py, the
models themselves (mu-law, WaveNet, AudioVQVAE) in test_speech_model.py.

The real data is ../shared/data/fsdd (or $VQVAE_FSDD).
"""
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import pytest
import torch

import train_vctk
import vqvae
from lab import files, runs

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
    out = run(tmp_path / "run", "--steps", "3", "--classifier-steps", "2")
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
    assert len(files.load_checkpoint(out / "vqvae.pt")["history"]["step"]) == 3
    # The one loader of any run restores the speech models, their weights as saved.
    model, prior = runs.load_run(out)
    assert isinstance(model, vqvae.AudioVQVAE) and isinstance(prior, vqvae.WaveNet) and not prior.training
    saved = files.load_checkpoint(out / "prior.pt")
    assert saved["model_class"] == "WaveNet" and prior.config.num_categories == model.config.num_embeddings
    assert all(torch.equal(v, saved["model"][k]) for k, v in prior.state_dict().items())
    # Eval alone reads the VQ-VAE, the classifiers and the prior back and repeats every measure; with
    # --wav-clips 0 it writes no WAV but still the figures.
    for f in [*wavs, out / "conversion.png"]:
        f.unlink()
    run(out, "--steps", "3", "--classifier-steps", "2", "--stages", "eval", "--wav-clips", "0")
    assert not list((out / "audio").glob("*.wav")) and (out / "conversion.png").exists()
    again = json.loads((out / "metrics.json").read_text())["metrics"]
    timed = {"generation_seconds", "generated_samples_per_second"}
    assert {k: v for k, v in again.items() if k not in timed} == {k: v for k, v in m.items() if k not in timed}


def test_resumed_run_repeats_uninterrupted_losses_and_refuses_to_overwrite(tmp_path, fsdd):
    full = run(tmp_path / "full", "--steps", "4", "--stages", "vqvae")
    part = run(tmp_path / "part", "--steps", "2", "--stages", "vqvae")
    with pytest.raises(SystemExit, match="--resume"):
        run(part, "--steps", "4", "--stages", "vqvae")
    run(part, "--steps", "4", "--stages", "vqvae", "--resume")
    a, b = files.load_checkpoint(full / "vqvae.pt"), files.load_checkpoint(part / "vqvae.pt")
    assert a["history"] == b["history"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_cosine_schedule_sets_the_learning_rate_from_the_step(tmp_path, fsdd):
    out = run(tmp_path / "cos", "--steps", "3", "--stages", "vqvae", "--lr", "1e-3", "--lr-schedule", "cosine")
    # the last step taken is step 2 of 3: lr = 1e-3 * (1 + cos(2 pi / 3)) / 2 = 2.5e-4
    lr = files.load_checkpoint(out / "vqvae.pt")["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(2.5e-4, rel=1e-12)


def test_torchrun_two_processes_train_every_stage_and_evaluate_on_rank_0(tmp_path, fsdd):
    # Evaluation runs on rank 0 alone after the others have left: nothing in it may wait for them
    # (the random-encoder probe's k-means once broadcast in the process group and crashed here).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_vctk.py"), "--data", str(fsdd), "--data-dir", str(CACHE["dir"]), "--out", str(tmp_path / "ddp"),
           *TINY,
           "--steps", "2", "--classifier-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "codebook identical on all 2 processes" in result.stdout
    report = json.loads((tmp_path / "ddp/metrics.json").read_text())
    assert report["world_size"] == 2 and 0 <= report["metrics"]["phone_accuracy_random_encoder_kmeans"] <= 1


def test_prior_of_an_earlier_vqvae_is_refused(tmp_path, fsdd):
    out = run(tmp_path / "stale", "--steps", "2", "--stages", "vqvae,prior")
    assert files.load_checkpoint(out / "prior.pt")["vqvae_id"].startswith("step 2, sha256 ")
    run(out, "--steps", "3", "--stages", "vqvae", "--resume")
    with pytest.raises(SystemExit, match="delete prior.pt"):
        run(out, "--steps", "3", "--stages", "prior", "--resume")
