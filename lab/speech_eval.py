"""What the speech script measures, writes and draws: log-mel features; the speaker and digit
classifiers that listen to generated audio (trained by the script's classifiers stage); the codes of
whole clips; the phone probe of Sec. 4.3 against random encoders; the eval clips, their
reconstructions and speaker conversions scored by the classifiers; the prior's bits per code and its
samples; WAV files and spectrograms."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import vqvae
from lab.figures import pyplot, save
from lab.files import load_checkpoint
from lab.speech import HOP, Speech, Split, fixed_length, write_wav


# ============================================================================ log-mel features, classifiers
def mel_filterbank(n_fft: int, rate: int, n_mels: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangles evenly spaced on the mel scale m = 2595 log10(1 + f / 700)."""
    def mel(f):
        return 2595 * np.log10(1 + f / 700)

    def hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    edges = hz(np.linspace(0, mel(rate / 2), n_mels + 2))                  # (n_mels + 2,) Hz
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up, down = (bins - lo) / (mid - lo), (hi - bins) / (hi - mid)
    return torch.from_numpy(np.maximum(0, np.minimum(up, down))).float()


def log_mel(x: torch.Tensor, rate: int, n_mels: int = 40) -> torch.Tensor:
    """Waveforms (B, T) -> log-mel (B, n_mels, frames): 32 ms Hann windows every 8 ms."""
    n_fft = 2 ** round(math.log2(rate * 0.032))
    spec = torch.stft(x, n_fft, n_fft // 4, window=torch.hann_window(n_fft, device=x.device), return_complex=True)
    return torch.log(mel_filterbank(n_fft, rate, n_mels).to(x.device) @ spec.abs() ** 2 + 1e-6)


def add_white_noise(x: torch.Tensor, snr_db: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Waveforms (B, T) plus white noise snr_db (a float or (B, 1)) decibels below each one's mean power."""
    power = x.pow(2).mean(1, keepdim=True)
    return x + torch.randn(x.shape, generator=generator) * (power * 10 ** (-torch.as_tensor(snr_db) / 10)).sqrt()


class MelClassifier(nn.Module):
    """Log-mel (B, n_mels, F) -> class logits: two convolutions over time, mean over frames."""

    def __init__(self, n_mels: int, num_classes: int, channels: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(n_mels, channels, 5, padding=2), nn.ReLU(),
                                 nn.Conv1d(channels, channels, 5, padding=2), nn.ReLU())
        self.out = nn.Linear(channels, num_classes)
        self.register_buffer("mean", torch.zeros(n_mels, 1))
        self.register_buffer("std", torch.ones(n_mels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.net((features - self.mean) / self.std).mean(2))


class Classifiers(nn.Module):
    """One MelClassifier per label ("speaker", "digit"); log-mel (B, n_mels, F) -> {label: logits}.
    They listen to generated audio in the speech script's eval: who speaks, and which digit."""

    def __init__(self, num_classes: dict[str, int], n_mels: int = 40):
        super().__init__()
        self.heads = nn.ModuleDict({k: MelClassifier(n_mels, n) for k, n in num_classes.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(features) for k, head in self.heads.items()}

    @classmethod
    def for_speech(cls, data: Speech) -> "Classifiers":
        """A speaker classifier, and a digit classifier where the clips have digits (FSDD)."""
        num_classes = {"speaker": len(data.speakers)}
        if data.train.digit is not None:
            num_classes["digit"] = 10
        return cls(num_classes)

    @classmethod
    def load(cls, path: Path, data: Speech, device) -> "Classifiers":
        """The classifiers of `path` (a checkpoint of their training) on `device`."""
        if not path.exists():
            raise SystemExit(f"{path} not found: run the classifiers stage first")
        classifiers = cls.for_speech(data).to(device)
        classifiers.load_state_dict(load_checkpoint(path)["model"])
        return classifiers

    @torch.no_grad()
    def normalise(self, clips: list[np.ndarray], length: int, rate: int) -> "Classifiers":
        """Standardise the features by their mean and deviation per band over a fixed sample of up to
        about 256 of `clips` (their first `length` samples)."""
        sample = log_mel(fixed_length(clips[::max(1, len(clips) // 256)], length), rate)
        for head in self.heads.values():
            head.mean.copy_(sample.mean((0, 2))[:, None])
            head.std.copy_(sample.std((0, 2))[:, None])
        return self

    @staticmethod
    def training_examples(split: Split, idx: np.ndarray, length: int, rate: int, generator: torch.Generator,
                          device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(log-mel features, {label: classes}) on `device` of the clips idx of `split`: random crops
        of `length` samples with white noise at a random level 20 dB or more below each crop.
        Why the noise: the classifiers then hear generated audio (which has a noise floor) by its
        content rather than by its noise. Louder noise (0-30 dB below the clip) made them worse on
        clean clips and no better at hearing the digit in generated audio."""
        x = split.random_crops(idx, length, generator)
        x = add_white_noise(x, 20 - 20 * torch.rand(len(x), 1, generator=generator).log10(), generator)
        labels = {"speaker": split.speaker[idx]}
        if split.digit is not None:
            labels["digit"] = split.digit[idx]
        return log_mel(x.to(device), rate), {k: torch.from_numpy(v).to(device) for k, v in labels.items()}


@torch.no_grad()
def class_probs(classifiers, x: torch.Tensor, rate: int, length: int) -> dict[str, torch.Tensor]:
    """Waveforms (B, T) -> (B, classes) probabilities per classifier, on the first `length` samples."""
    x = F.pad(x, (0, max(0, length - x.shape[1])))[:, :length]
    return {k: logits.softmax(1).cpu() for k, logits in classifiers.eval()(log_mel(x, rate)).items()}


@torch.no_grad()
def classifier_scores(classifiers, data: Speech, length: int, seed: int, device) -> dict:
    """The classifiers on every real test clip, clean and with white noise 10 dB below it: how well
    they work, and how well through noise, before they listen to generated audio."""
    test, rate = data.test, data.sample_rate
    real = fixed_length(test.audio, length)
    labels = {"speaker": test.speaker, "digit": test.digit}
    metrics = {}
    for suffix, x in (("", real), ("_10db", add_white_noise(real, 10.0, torch.Generator().manual_seed(seed)))):
        for k, probs in class_probs(classifiers, x.to(device), rate, length).items():
            metrics[f"real_test_{k}_accuracy{suffix}"] = float((probs.argmax(1).numpy() == labels[k]).mean())
            metrics[f"real_test_{k}_confidence{suffix}"] = probs.max(1).values.mean().item()
    return metrics


# ============================================================================ codes
@torch.no_grad()
def encode_clips(model, clips: list[np.ndarray], device, batch_size: int = 64) -> list[np.ndarray]:
    """Codes of whole clips (each padded with silence to a multiple of 64 samples), one array per clip."""
    order, codes = np.argsort([len(c) for c in clips]), [None] * len(clips)
    for i in range(0, len(clips), batch_size):
        chosen = order[i:i + batch_size]
        length = -(-max(len(clips[j]) for j in chosen) // HOP) * HOP
        levels = vqvae.mu_law_encode(fixed_length([clips[j] for j in chosen], length)).to(device)
        batch_codes = model.quantizer(model.encode(levels)).codes.cpu().numpy()
        for row, j in enumerate(chosen):
            codes[j] = batch_codes[row, :-(-len(clips[j]) // HOP)]
    return codes


def clip_codes(model, clips: list[np.ndarray], length: int, device) -> torch.Tensor:
    """(N, length / 64) codes of the first `length` samples of each clip (silence after its end)."""
    return torch.from_numpy(np.stack(encode_clips(model, list(fixed_length(clips, length).numpy()), device)))


# ============================================================================ the phone probe
def frame_phones(name: str, num_frames: int, rate: int, alignments, phones: list[str]) -> np.ndarray:
    """Phone index at the centre of each code frame (64 samples), -1 where the alignment has none."""
    labels = np.full(num_frames, -1, np.int64)
    centres = (np.arange(num_frames) * HOP + HOP / 2) / rate
    for phone, start, end in alignments.get(name, []):
        labels[(centres >= start) & (centres < end)] = phones.index(phone)
    return labels


def phone_probe(model, data: Speech, device) -> dict:
    """Sec. 4.3's probe: each code -> its most frequent phone on training frames; frame accuracy on
    test frames. Returns accuracy, the (K, P) train counts and the test confusion inputs."""
    phones = sorted({p for segs in data.alignments.values() for p, _, _ in segs})
    K = model.config.num_embeddings
    stats = {}
    for part, split in (("train", data.train), ("test", data.test)):
        keep = [i for i, n in enumerate(split.names) if n in data.alignments]
        codes = encode_clips(model, [split.audio[i] for i in keep], device)
        labels = [frame_phones(split.names[i], len(c), data.sample_rate, data.alignments, phones)
                  for i, c in zip(keep, codes)]
        codes, labels = np.concatenate(codes), np.concatenate(labels)
        stats[part] = (codes[labels >= 0], labels[labels >= 0])
    counts = np.zeros((K, len(phones)), np.int64)
    np.add.at(counts, stats["train"], 1)
    majority = int(np.bincount(stats["train"][1], minlength=len(phones)).argmax())
    mapping = np.where(counts.sum(1) > 0, counts.argmax(1), majority)          # unseen codes: majority
    codes, labels = stats["test"]
    return {"accuracy": float((mapping[codes] == labels).mean()),
            "majority_accuracy": float((labels == majority).mean()),
            "codes_used_train": int((counts.sum(1) > 0).sum()), "counts": counts, "phones": phones,
            "test_codes": codes, "test_labels": labels, "num_test_frames": len(labels)}


def random_encoder_probes(seed: int, data: Speech, config, device) -> dict:
    """The probe on an untrained encoder: with its random codebook (as the paper's baseline), and
    with a codebook fitted by k-means to its outputs (a stronger baseline, not in the paper)."""
    torch.manual_seed(seed + 1)
    random_model = vqvae.AudioVQVAE(config).to(device).eval()
    results = {"random_encoder": phone_probe(random_model, data, device)["accuracy"]}
    clips = data.train.audio[::max(1, len(data.train.audio) // 200)]
    with torch.no_grad():
        z_e = torch.cat([random_model.encode(vqvae.mu_law_encode(fixed_length([c], -(-len(c) // HOP) * HOP)).to(device))
                         for c in clips], 2)                                   # (1, D, frames)
        random_model.quantizer.kmeans(z_e)
    results["random_encoder_kmeans"] = phone_probe(random_model, data, device)["accuracy"]
    return results


# ============================================================================ evaluation
@dataclass
class EvalClips:
    """The test clips that eval reconstructs and converts, and the speaker each is converted to."""
    picks: np.ndarray            # (N,) their indices in the test split, ascending
    length: int                  # samples generated per clip: the longest, in whole codes, at most the classifiers'
    levels: torch.Tensor         # (N, length) mu-law levels on the device, silence past each clip's end
    inside: torch.Tensor         # (N, length) bool on the CPU: before the clip's end
    source: torch.Tensor         # (N,) each clip's speaker, on the device
    target: torch.Tensor         # (N,) another speaker for each clip, on the device


def choose_eval_clips(test: Split, num_speakers: int, eval_clips: int, max_length: int, seed: int,
                      device) -> EvalClips:
    """The same number of test clips from every speaker (eval_clips // S, at least one), seeded, cut
    to max_length samples; the k-th clip of a speaker is converted to the (1 + k mod (S - 1))-th
    speaker after it."""
    S = num_speakers
    rng = np.random.default_rng(seed)
    per_speaker = max(1, eval_clips // S)
    picks = np.sort(np.concatenate([rng.permutation(np.flatnonzero(test.speaker == s))[:per_speaker]
                                    for s in range(S)]))
    gen_length = min(max_length, -(-max(len(test.audio[i]) for i in picks) // HOP) * HOP)
    levels = vqvae.mu_law_encode(fixed_length([test.audio[i] for i in picks], gen_length)).to(device)
    source = torch.from_numpy(test.speaker[picks]).to(device)
    rank_in_speaker = np.array([np.sum(test.speaker[picks[:j]] == test.speaker[picks[j]]) for j in range(len(picks))])
    target = (source + 1 + torch.from_numpy(rank_in_speaker % max(1, S - 1)).to(device)) % S  # another speaker
    inside = torch.arange(gen_length)[None] < torch.tensor([len(test.audio[i]) for i in picks])[:, None]
    return EvalClips(picks, gen_length, levels, inside, source, target)


class EvalWaves(NamedTuple):
    """Waveforms (N, length) of the eval clips on the CPU, each zero past its clip's end."""
    original: torch.Tensor
    reconstruction: torch.Tensor     # the clip's codes decoded as its own speaker
    conversion: torch.Tensor         # the clip's codes decoded as the target speaker


@torch.no_grad()
def prior_bits_per_code(model, prior, data: Speech, length: int, device) -> dict:
    """The prior's test bits per code (the codes of each test clip's first `length` samples), and
    those of the codes' unigram frequencies on the training clips (add-one smoothed)."""
    test = clip_codes(model, data.test.audio, length, device)
    speaker = torch.from_numpy(data.test.speaker)
    nats = sum(-prior.log_prob(test[i:i + 64].to(device), None, speaker[i:i + 64].to(device)).sum().item()
               for i in range(0, len(test), 64))
    unigram = torch.bincount(clip_codes(model, data.train.audio, length, device).flatten(),
                             minlength=model.config.num_embeddings) + 1.0
    return {"prior_test_bits_per_code": nats / test.numel() / math.log(2),
            "unigram_test_bits_per_code": -(unigram / unigram.sum()).log2()[test].mean().item()}


def score_generated(classifiers: Classifiers, data: Speech, clips: EvalClips, generated: torch.Tensor, length: int,
                    out: Path, wav_clips: int) -> dict:
    """generated (2N, length) on the CPU: the eval clips' codes decoded as their own speaker, then as
    the target speaker. How often the classifiers hear the source speaker in the reconstructions,
    the target speaker (and the source) in the conversions, and, with digits, the clip's digit in
    both; WAVs of the first clip of each of the first wav_clips speakers, and spectrograms
    (write_eval_files)."""
    n, device, rate, digit = len(clips.picks), clips.levels.device, data.sample_rate, data.test.digit
    generated = generated * clips.inside.repeat(2, 1)  # past a clip's end, zeros as in the original
    waves = EvalWaves(vqvae.mu_law_decode(clips.levels).cpu() * clips.inside, generated[:n], generated[n:])
    recon_probs = class_probs(classifiers, waves.reconstruction.to(device), rate, length)
    pr = {k: p.argmax(1).numpy() for k, p in recon_probs.items()}
    pc = {k: p.argmax(1).numpy() for k, p in class_probs(classifiers, waves.conversion.to(device), rate, length).items()}
    src, tgt = clips.source.cpu().numpy(), clips.target.cpu().numpy()
    metrics = {"reconstruction_speaker_accuracy": float((pr["speaker"] == src).mean()),
               "conversion_target_speaker_rate": float((pc["speaker"] == tgt).mean()),
               "conversion_source_speaker_rate": float((pc["speaker"] == src).mean())}
    if "digit" in pr:
        metrics["reconstruction_digit_accuracy"] = float((pr["digit"] == digit[clips.picks]).mean())
        metrics["conversion_digit_kept_rate"] = float((pc["digit"] == digit[clips.picks]).mean())
        metrics["reconstruction_digit_confidence"] = recon_probs["digit"].max(1).values.mean().item()
    metrics["num_eval_clips"], metrics["speaker_chance"] = n, 1 / len(data.speakers)
    write_eval_files(out, data, clips, waves, wav_clips)
    return metrics


def phone_probe_scores(model, data: Speech, seed: int, out: Path, device) -> dict:
    """The phone probe of the trained encoder, against the majority phone and two random encoders
    (random_encoder_probes, seeded by seed + 1); draws <out>/code_phone.png."""
    print("[eval] phone probe: trained encoder, random encoder, random encoder + k-means codebook", flush=True)
    probe = phone_probe(model, data, device)
    metrics = {"phone_accuracy": probe["accuracy"], "phone_majority_accuracy": probe["majority_accuracy"],
               "phone_num_test_frames": probe["num_test_frames"]}
    for k, v in random_encoder_probes(seed, data, model.config, device).items():
        metrics[f"phone_accuracy_{k}"] = v
    plot_code_phone(out / "code_phone.png", probe)
    return metrics


def score_prior_samples(classifiers: Classifiers, data: Speech, waves: torch.Tensor, speaker: torch.Tensor,
                        per_speaker: int, length: int, out: Path, wav_clips: int, device) -> dict:
    """waves (N, T) on the CPU: decoded samples of the prior, per_speaker of each speaker in turn
    (`speaker`). How often the classifiers hear the speaker, how sure the digit classifier is (low
    on babble); WAVs and spectrograms (write_prior_samples)."""
    probs = class_probs(classifiers, waves.to(device), data.sample_rate, length)
    metrics = {"prior_sample_speaker_rate": float((probs["speaker"].argmax(1) == speaker.cpu()).float().mean())}
    if "digit" in probs:
        metrics["prior_sample_digit_confidence"] = probs["digit"].max(1).values.mean().item()
    metrics["num_prior_samples"] = len(waves)
    write_prior_samples(out, data, waves, per_speaker, wav_clips)
    return metrics


# ============================================================================ files and figures
def write_eval_files(out: Path, data: Speech, clips: EvalClips, waves: EvalWaves, wav_clips: int) -> None:
    """WAVs (original, reconstruction, conversion) of the first eval clip of each of the first
    wav_clips speakers, and spectrograms of those of the first four speakers."""
    test, rate = data.test, data.sample_rate
    src, tgt = clips.source.cpu().numpy(), clips.target.cpu().numpy()
    shown = [int(np.flatnonzero(src == s)[0]) for s in range(len(data.speakers)) if (src == s).any()]
    for j in shown[:wav_clips]:
        name, n = test.names[clips.picks[j]], min(len(test.audio[clips.picks[j]]), clips.length)
        write_wav(out / "audio" / f"{name}_original.wav", waves.original[j, :n].numpy(), rate)
        write_wav(out / "audio" / f"{name}_reconstruction.wav", waves.reconstruction[j, :n].numpy(), rate)
        write_wav(out / "audio" / f"{name}_as_{data.speakers[tgt[j]]}.wav", waves.conversion[j, :n].numpy(), rate)
    rows = [(test.names[clips.picks[j]], [("original", waves.original[j]), ("reconstruction", waves.reconstruction[j])])
            for j in shown[:4]]
    plot_spectrograms(out / "reconstructions.png", rows, rate, "held-out clips and their reconstructions")
    rows = [(test.names[clips.picks[j]], [("original", waves.original[j]),
                                          (f"as {data.speakers[tgt[j]]}", waves.conversion[j])]) for j in shown[:4]]
    plot_spectrograms(out / "conversion.png", rows, rate,
                      "speaker conversion: codes of one speaker, decoded as another")


def write_prior_samples(out: Path, data: Speech, waves: torch.Tensor, per_speaker: int, wav_clips: int) -> None:
    """The prior's samples (per_speaker of each speaker in turn): a WAV of the first of each of the
    first wav_clips speakers, spectrograms of up to three of each of the first four."""
    rate, firsts = data.sample_rate, list(range(0, len(waves), per_speaker))
    for s, j in enumerate(firsts[:wav_clips]):
        write_wav(out / "audio" / f"prior_sample_{data.speakers[s]}.wav", waves[j].numpy(), rate)
    rows = [(data.speakers[s], [(f"sample {k + 1}", waves[j + k]) for k in range(min(3, per_speaker))])
            for s, j in enumerate(firsts[:4])]
    plot_spectrograms(out / "prior_samples.png", rows, rate, "samples of the prior: codes sampled, then decoded")


def plot_spectrograms(path: Path, rows, rate: int, title: str) -> None:
    """One row per clip, one log-mel panel per (label, waveform) of that row: time in seconds
    across, the 40 mel bands from low to high frequency up."""
    if not rows:
        return
    plt = pyplot()
    cols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 1.8 * len(rows) + 0.4), squeeze=False)
    for r, (name, panels) in enumerate(rows):
        for c, (label, x) in enumerate(panels):
            ax = axes[r][c]
            mel = log_mel(x[None].float(), rate)[0].numpy()
            ax.imshow(mel, origin="lower", aspect="auto", vmin=-14, vmax=4, extent=(0, len(x) / rate, 0, len(mel)))
            ax.set_title(f"{name}: {label}", fontsize=8)
            ax.tick_params(labelsize=7)
            if r == len(rows) - 1:
                ax.set_xlabel("time (s)", fontsize=7)
            if c == 0:
                ax.set_ylabel("mel band", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


def plot_code_phone(path: Path, probe: dict, num_codes: int = 60) -> None:
    """P(phone | code) on training frames for the most used codes, grouped by their mapped phone."""
    plt = pyplot()
    counts = probe["counts"]
    top = np.argsort(-counts.sum(1))[:num_codes]
    top = top[counts.sum(1)[top] > 0]
    top = top[np.argsort(counts[top].argmax(1), kind="stable")]
    p = counts[top] / counts[top].sum(1, keepdims=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    fig.colorbar(ax.imshow(p.T, aspect="auto", cmap="Greys", vmin=0), ax=ax, fraction=0.03)
    ax.set_yticks(range(len(probe["phones"])), probe["phones"], fontsize=7)
    ax.set_xticks(range(len(top)), [str(k) for k in top], fontsize=5, rotation=90)
    ax.set_xlabel(f"code (the {len(top)} most used on training frames)")
    ax.set_title(f"P(phone | code); test frame accuracy of code -> most frequent phone: {probe['accuracy']:.1%} "
                 f"(majority phone {probe['majority_accuracy']:.1%})", fontsize=9)
    fig.tight_layout()
    save(fig, path)
