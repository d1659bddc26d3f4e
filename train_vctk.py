"""The paper's speech experiments (Sec. 4.3), end to end.

Stages, each resumable: (1) vqvae: train the audio VQ-VAE (64x downsampling encoder, K = 512,
WaveNet decoder conditioned on the codes and the speaker) on random fixed-length crops;
(2) classifiers: a speaker and a digit classifier on log-mel features of real training clips;
(3) prior: a second WaveNet over the codes of the first --clip-seconds of each training clip,
conditioned on the speaker (the paper's prior for unconditional speech);
(4) eval: teacher-forced test loss, reconstructions and speaker conversions generated with the
WaveNet (WAV files and spectrograms), the classifiers applied to them, and the phone probe of the
paper (each code mapped to its most frequent aligned phone; frame accuracy on test clips) against
the same probe on a randomly initialised encoder and the majority phone; with a prior, its test
bits per code and samples from it (codes sampled, then decoded), judged by the classifiers.
Everything lands in --out: vqvae.pt, classifiers.pt, prior.pt, metrics.json, *.png, audio/*.wav.

    python train_vctk.py --data ../shared/data/fsdd     # quick preset on FSDD (8 kHz digits)
    python train_vctk.py --data ../shared/data/fsdd --preset long   # quick with 4x the VQ-VAE's steps
    python train_vctk.py --data ~/VCTK-Corpus           # VCTK 0.80 (wav48/pNNN/*.wav), at 16 kHz
    python train_vctk.py --data ~/VCTK-Corpus-0.92      # VCTK 0.92 (*_mic1.flac): pip install soundfile

VCTK has no digits and no phone alignments: there the digit classifier and the phone probe are
skipped. A held-out VCTK clip is every 10th utterance of each speaker (the corpus has no split).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import training
import vqvae

VCTK_URL = "https://datashare.ed.ac.uk/handle/10283/3443"
HOP = 64  # samples per code: 6 stride-2 convolutions

# Each preset sets the defaults of the options below (named after the config fields); any option on
# the command line wins. What each costs and scores is measured in README.md and TUTORIAL.md.
PRESETS = {
    # The whole pipeline on FSDD on a CPU: a small WaveNet (10 layers, receptive field 1024 samples),
    # 0.256 s crops; a prior of 12 layers whose receptive field (127 codes) spans the 1 s it models.
    # The EMA codebook collapses to a handful of codes at the start (the encoder's first outputs are
    # all nearest to one random code): k-means on the first batch and restarting codes unused for
    # ~200 steps (not in the paper) keep many codes in use.
    "quick": dict(hidden_channels=64, res_channels=32, num_res_layers=1, embedding_dim=64, num_embeddings=512,
                  decay=0.99, commitment_cost=0.25, kmeans_init=True, dead_code_threshold=0.1, wavenet_channels=32,
                  skip_channels=64, wavenet_layers=10, dilation_cycle=10, crop=2048, batch_size=8, steps=3000,
                  lr=1e-3, lr_schedule="constant", clf_steps=1000, prior_channels=64, prior_num_layers=12,
                  prior_cycle=6, prior_steps=1000, prior_batch_size=32, prior_lr=1e-3),
    # Sec. 4.3 gives the encoder (6 stride-2 convolutions of window 4) and K = 512; the WaveNet's
    # size and the optimisation are not given: 30 layers in 3 cycles of dilations 1..512 and
    # 1 s crops are a common WaveNet setting. A GPU job. If the codebook collapses (see quick),
    # add --kmeans-init --dead-code-threshold 0.1.
    "paper": dict(hidden_channels=256, res_channels=256, num_res_layers=2, embedding_dim=64, num_embeddings=512,
                  decay=0.99, commitment_cost=0.25, kmeans_init=False, dead_code_threshold=None,
                  wavenet_channels=128, skip_channels=256, wavenet_layers=30, dilation_cycle=10, crop=16384,
                  batch_size=16, steps=200_000, lr=2e-4, lr_schedule="constant", clf_steps=2000, prior_channels=256,
                  prior_num_layers=20, prior_cycle=10, prior_steps=100_000, prior_batch_size=32, prior_lr=1e-3),
}
# quick trained longer: 4x the VQ-VAE's steps, 3x the classifiers' and 2x the prior's.
PRESETS["long"] = {**PRESETS["quick"], "steps": 12_000, "clf_steps": 3000, "prior_steps": 2000}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="quick",
                   help="quick (default): the whole pipeline on FSDD on a CPU; long: quick trained longer (4x the "
                        "VQ-VAE's steps); paper: the paper's encoder and K = 512 with a 30-layer WaveNet (a GPU job)")
    p.add_argument("--data", type=Path, default=None,
                   help="an FSDD checkout (recordings/*.wav, alignments.tsv) or a VCTK folder "
                        f"(wav48/ of 0.80 or wav48_silence_trimmed/ of 0.92; from {VCTK_URL})")
    p.add_argument("--sample-rate", type=int, default=16000, help="VCTK is resampled from 48 kHz to this")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="decoded (resampled) corpus caches")
    training.add_run_arguments(p, "vqvae,classifiers,prior,eval", log_every=50, checkpoint_every=500)
    p.add_argument("--max-train-clips", type=int, default=None, help="a seeded random subset, for tests")
    p.add_argument("--max-test-clips", type=int, default=None, help="a seeded random subset, for tests")
    p.add_argument("--max-clips-per-speaker", type=int, default=None, help="read at most this many (VCTK)")
    p.add_argument("--eval-clips", type=int, default=120,
                   help="test clips reconstructed and converted (the same number per speaker); prior samples")
    p.add_argument("--wav-clips", type=int, default=6, help="of those, how many are written as WAV files")
    p.add_argument("--clip-seconds", type=float, default=1.0, help="classifier input length (longer clips are cut)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the WaveNets (decoder and prior) in eval")
    g = p.add_argument_group("audio VQ-VAE (defaults from --preset)")
    training.add_encoder_arguments(g, "encoder")
    training.add_codebook_arguments(g)
    g.add_argument("--wavenet-channels", type=int, help="residual channels of the WaveNet")
    g.add_argument("--skip-channels", type=int, help="skip channels of the WaveNet")
    g.add_argument("--wavenet-layers", type=int, help="layers of the WaveNet")
    g.add_argument("--dilation-cycle", type=int, help="dilations 1, 2, ..., 2^(cycle-1), repeated")
    g.add_argument("--crop", type=int, help="training crop in samples, a multiple of 64")
    training.add_optimizer_arguments(g)
    g.add_argument("--clf-steps", type=int, help="steps of the log-mel classifiers (batch 32)")
    g = p.add_argument_group("prior over codes: a WaveNet conditioned on the speaker (defaults from --preset)",
                             "Its skip channels are twice --prior-channels; a batch is --prior-batch-size code\n"
                             "sequences of --clip-seconds per process.")
    training.add_prior_arguments(g)
    g.add_argument("--prior-cycle", type=int, help="dilations 1, 2, ..., 2^(cycle-1), repeated")
    args = training.parse_with_presets(p, PRESETS, argv, "speech")
    if args.crop % HOP:
        p.error(f"--crop must be a multiple of {HOP}")
    return args


# ============================================================================ data
class DataError(Exception):
    """A data source that is missing or not in an expected layout; the message says what to do."""


@dataclass
class Split:
    audio: list[np.ndarray]      # float32 waveforms in [-1, 1]
    speaker: np.ndarray          # (N,) int64 index into Speech.speakers
    names: list[str]             # file stems
    digit: np.ndarray | None     # (N,) int64 spoken digit (FSDD), else None


@dataclass
class Speech:
    sample_rate: int
    speakers: list[str]
    train: Split
    test: Split
    alignments: dict[str, list[tuple[str, float, float]]] | None  # stem -> (phone, start s, end s)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """PCM WAV (8, 16 or 32 bit, any channel count) -> mono float32 in [-1, 1] and sample rate."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate, frames = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            raw = w.readframes(frames)
    except wave.Error as e:
        if "unknown format" in str(e):  # e.g. IEEE float or WAVE_FORMAT_EXTENSIBLE (24-bit) files
            return read_soundfile(path, "this WAV encoding")
        raise DataError(f"{path}: not a readable PCM WAV file ({e})") from e
    except (EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable PCM WAV file ({e})") from e
    if frames == 0:
        raise DataError(f"{path}: holds no samples")
    if len(raw) != frames * width * channels:
        raise DataError(f"{path}: truncated: its header announces {frames} frames, the file holds "
                        f"{len(raw) // (width * channels)}")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / 2 ** (8 * width - 1)
    else:
        return read_soundfile(path, f"{8 * width}-bit WAV")
    return x.reshape(-1, channels).mean(1), rate


def read_soundfile(path: Path, what: str = "FLAC (VCTK 0.92)") -> tuple[np.ndarray, int]:
    """Any format libsndfile reads (FLAC, 24-bit or float WAV), through the optional soundfile package."""
    try:
        import soundfile
    except ImportError as e:
        raise DataError(f"{path}: reading {what} needs the optional soundfile package: pip install soundfile") from e
    try:
        x, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise DataError(f"{path}: not a readable audio file ({e})") from e
    if len(x) == 0:
        raise DataError(f"{path}: holds no samples")
    return x.mean(1), rate


def write_wav(path: Path, x: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).round().astype("<i2").tobytes())


@functools.lru_cache(maxsize=8)
def resampling_filters(orig_rate: int, new_rate: int, zeros: int = 16) -> tuple[torch.Tensor, int, int]:
    """The polyphase filter bank of resample: (L, taps) float32, and (L, M) with new / orig = L / M.

    Output sample n = r + L j lies at input time t = j M + r M / L. For each phase r that is the
    input filtered by a Hann-windowed sinc low-pass at min(orig, new) / 2, h(d) = c sinc(c d)
    (0.5 + 0.5 cos(pi d / W)), |d| < W = zeros / c input samples, c = min(1, new / orig), sampled at
    the 2W inputs around t; filter r is placed at its offset floor(r M / L) in the taps, so that one
    matrix product of the input's windows (stride M) with the bank computes every phase.
    """
    g = math.gcd(orig_rate, new_rate)
    L, M = new_rate // g, orig_rate // g
    cutoff = min(1.0, new_rate / orig_rate)               # of the input's Nyquist frequency
    width = math.ceil(zeros / cutoff)                     # W: filter half-width in input samples
    r = np.arange(L)
    offset, phase = (r * M) // L, (r * M % L) / L          # floor(r M / L), its fraction
    q = np.arange(-width + 1, width + 1)                   # taps around floor(t)
    d = phase[:, None] - q[None]                           # (L, 2W) distances t - tap
    h = cutoff * np.sinc(cutoff * d) * (0.5 + 0.5 * np.cos(np.pi * np.clip(d / width, -1, 1)))
    bank = np.zeros((L, M - 1 + 2 * width))
    for i in range(L):
        bank[i, offset[i]:offset[i] + 2 * width] = h[i]
    return torch.from_numpy(bank).float(), L, M


def resample(x: np.ndarray, orig_rate: int, new_rate: int, zeros: int = 16) -> np.ndarray:
    """Band-limited resampling by a rational factor new / orig = L / M: the input's windows at stride M
    times the polyphase filter bank of resampling_filters (one matrix product); ceil(len(x) L / M)
    samples out."""
    if orig_rate == new_rate:
        return x.astype(np.float32)
    bank, L, M = resampling_filters(orig_rate, new_rate, zeros)
    width = (bank.shape[-1] - M + 1) // 2
    n_out = math.ceil(len(x) * L / M)
    per_phase = -(-n_out // L)                             # outputs of each phase, ceil(n_out / L)
    right = max(0, (per_phase - 1) * M + bank.shape[-1] - (len(x) + width - 1))
    padded = F.pad(torch.from_numpy(np.ascontiguousarray(x, np.float32)), (width - 1, right))
    windows = padded.unfold(0, bank.shape[-1], M)[:per_phase]   # (per_phase, taps), a strided view
    y = windows @ bank.t()                                      # (per_phase, L): y[j, r] is sample r + L j
    return y.reshape(-1)[:n_out].numpy()


def load_fsdd(root: Path) -> Speech:
    """recordings/{digit}_{speaker}_{index}.wav; official split: index 0-4 test, 5-49 train."""
    files = sorted((root / "recordings").glob("*.wav"))
    if not files:
        raise DataError(f"{root}/recordings: no .wav files")
    items = []
    for f in files:
        parts = f.stem.split("_")
        if len(parts) != 3 or parts[0] not in tuple("0123456789") or not parts[2].isdigit():
            raise DataError(f"{f}: expected the FSDD name {{digit 0-9}}_{{speaker}}_{{index}}.wav")
        audio, rate = read_wav(f)
        if rate != 8000:
            raise DataError(f"{f}: {rate} Hz, FSDD is 8 kHz")
        items.append((int(parts[2]) < 5, parts[1], int(parts[0]), f.stem, audio))
    speakers = sorted({s for _, s, _, _, _ in items})
    unseen = sorted({s for test, s, _, _, _ in items if test} - {s for test, s, _, _, _ in items if not test})
    if unseen:
        raise DataError(f"{root}/recordings: speaker {unseen[0]} has test clips (index 0-4) but no training "
                        "clips (index 5 or more); the model cannot learn that speaker's id")

    def split(test: bool) -> Split:
        chosen = [it for it in items if it[0] == test]
        return Split([it[4] for it in chosen], np.array([speakers.index(it[1]) for it in chosen], np.int64),
                     [it[3] for it in chosen], np.array([it[2] for it in chosen], np.int64))

    alignments = None
    if (root / "alignments.tsv").exists():
        alignments = {}
        for number, line in enumerate((root / "alignments.tsv").read_text().splitlines()[1:], start=2):
            try:
                name, _, _, _, phone, start, end = line.split("\t")
                interval = (phone, float(start), float(end))
            except ValueError as e:
                raise DataError(f"{root}/alignments.tsv line {number}: expected 7 tab-separated columns "
                                f"(file, speaker, digit, word, phone, start_s, end_s); got {line!r}") from e
            alignments.setdefault(Path(name).stem, []).append(interval)
    return Speech(8000, speakers, split(False), split(True), alignments)


def load_vctk(root: Path, rate: int, max_per_speaker: int | None = None, test_every: int = 10) -> Speech:
    """VCTK 0.80 (wav48/pNNN/pNNN_MMM.wav) or 0.92 (wav48_silence_trimmed/pNNN/pNNN_MMM_mic1.flac),
    resampled to `rate`. Every test_every-th utterance of each speaker is held out."""
    if (root / "wav48").is_dir():
        folder, pattern, read = root / "wav48", "*.wav", read_wav
    else:
        folder, pattern, read = root / "wav48_silence_trimmed", "*_mic1.flac", read_soundfile
    speakers = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob(pattern)))
    if not speakers:
        raise DataError(f"{folder}: no speaker folders with {pattern} files")
    parts = {False: ([], [], []), True: ([], [], [])}
    for s, speaker in enumerate(speakers):
        for i, f in enumerate(sorted((folder / speaker).glob(pattern))[:max_per_speaker]):
            audio, orig = read(f)
            audio_list, speaker_list, names = parts[i % test_every == test_every - 1]
            audio_list.append(resample(audio, orig, rate))
            speaker_list.append(s)
            names.append(f.stem)
    train, test = (Split(a, np.array(s, np.int64), n, None) for a, s, n in (parts[False], parts[True]))
    if not train.audio or not test.audio:
        raise DataError(f"{folder}: too few utterances for a train/test split (every {test_every}th is test)")
    return Speech(rate, speakers, train, test, None)


def load_speech(source: Path | None, rate: int, max_per_speaker: int | None = None,
                data_dir: Path | None = None) -> Speech:
    """FSDD or VCTK (see load_fsdd, load_vctk); with data_dir, decoded once and cached there as
    .npz, keyed by the folder's content and these settings (training.source_key)."""
    if source is None:
        raise DataError(f"pass --data: an FSDD checkout or a VCTK folder (download VCTK from {VCTK_URL})")
    is_fsdd = (source / "recordings").is_dir()
    if not (is_fsdd or (source / "wav48").is_dir() or (source / "wav48_silence_trimmed").is_dir()):
        raise DataError(f"--data {source}: expected recordings/ (FSDD), wav48/ (VCTK 0.80) or "
                        "wav48_silence_trimmed/ (VCTK 0.92)")

    def load() -> Speech:
        return load_fsdd(source) if is_fsdd else load_vctk(source, rate, max_per_speaker)
    if data_dir is None:
        return load()
    cache = data_dir / f"speech-{source.name}-{training.source_key(source, rate, max_per_speaker)}.npz"
    arrays = training.load_npz(cache, keys=("sample_rate", "speakers", "alignments", "train_audio", "test_audio"))
    if arrays is not None:
        return speech_from_arrays(arrays)
    data = load()
    training.save_npz(cache, speech_arrays(data))
    return data


def speech_arrays(data: Speech) -> dict[str, np.ndarray]:
    """A Speech as flat arrays for np.savez: each split's clips concatenated, with their lengths."""
    arrays = {"sample_rate": np.array(data.sample_rate), "speakers": np.array(data.speakers, dtype=str),
              "alignments": np.array(json.dumps(data.alignments))}
    for name, split in (("train", data.train), ("test", data.test)):
        arrays[f"{name}_audio"] = np.concatenate(split.audio) if split.audio else np.zeros(0, np.float32)
        arrays[f"{name}_lengths"] = np.array([len(a) for a in split.audio], np.int64)
        arrays[f"{name}_speaker"], arrays[f"{name}_names"] = split.speaker, np.array(split.names, dtype=str)
        if split.digit is not None:
            arrays[f"{name}_digit"] = split.digit
    return arrays


def speech_from_arrays(a: dict[str, np.ndarray]) -> Speech:
    splits = []
    for name in ("train", "test"):
        audio = np.split(a[f"{name}_audio"], np.cumsum(a[f"{name}_lengths"])[:-1])
        splits.append(Split(list(audio), a[f"{name}_speaker"], [str(n) for n in a[f"{name}_names"]],
                            a.get(f"{name}_digit")))
    alignments = json.loads(str(a["alignments"]))
    if alignments is not None:
        alignments = {k: [tuple(iv) for iv in v] for k, v in alignments.items()}
    return Speech(int(a["sample_rate"]), [str(s) for s in a["speakers"]], splits[0], splits[1], alignments)


def subset(split: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(split.audio):
        return split
    keep = np.sort(np.random.default_rng(seed).permutation(len(split.audio))[:n])
    return Split([split.audio[i] for i in keep], split.speaker[keep], [split.names[i] for i in keep],
                 None if split.digit is None else split.digit[keep])


def random_crops(clips: list[np.ndarray], length: int, generator: torch.Generator) -> torch.Tensor:
    """(B, length) float: a random window of each clip; a shorter clip lands at a random offset in silence."""
    out = torch.zeros(len(clips), length)
    for b, clip in enumerate(clips):
        clip = torch.from_numpy(clip)
        shift = int(torch.randint(abs(len(clip) - length) + 1, (), generator=generator))
        if len(clip) >= length:
            out[b] = clip[shift:shift + length]
        else:
            out[b, shift:shift + len(clip)] = clip
    return out


def fixed_length(clips: list[np.ndarray], length: int) -> torch.Tensor:
    """(B, length) float: each clip from its start, cut or padded with silence at the end."""
    out = torch.zeros(len(clips), length)
    for b, clip in enumerate(clips):
        n = min(len(clip), length)
        out[b, :n] = torch.from_numpy(clip[:n])
    return out


# ============================================================================ log-mel features
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
    """One MelClassifier per label ("speaker", "digit"); log-mel (B, n_mels, F) -> {label: logits}."""

    def __init__(self, num_classes: dict[str, int], n_mels: int = 40):
        super().__init__()
        self.heads = nn.ModuleDict({k: MelClassifier(n_mels, n) for k, n in num_classes.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(features) for k, head in self.heads.items()}


# ============================================================================ stages
def crop_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Crop offsets as a pure function of the step, so that a resumed run sees the same crops."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)


def train_vqvae(args, run: training.Run, env, data: Speech):
    """The audio VQ-VAE on random crops of the training clips, into <out>/vqvae.pt with the speakers
    and the sample rate. Returns (model, history or None if stopped)."""
    config = training.config_from_args(vqvae.AudioVQVAEConfig, args, num_speakers=len(data.speakers))
    model = vqvae.AudioVQVAE(config).to(env.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train = data.train

    def loss_fn(ddp, step):
        training.set_learning_rate(optimizer, args.lr, args.lr_schedule, step, args.steps)
        idx = training.batch_indices(step, len(train.audio), args.batch_size, args.seed, env)
        crops = random_crops([train.audio[i] for i in idx], args.crop, crop_generator(args.seed, step, env.rank))
        out = ddp(vqvae.mu_law_encode(crops).to(env.device), torch.from_numpy(train.speaker[idx.numpy()]).to(env.device))
        return out.loss, training.vq_metrics(out)

    extra = {"speakers": data.speakers, "sample_rate": data.sample_rate}
    history = training.run_loop("vqvae", model, optimizer, loss_fn, args.steps, run, env, extra)
    training.check_replicas_equal("codebook", model.quantizer.codebook)
    return model, history


def make_classifiers(data: Speech) -> Classifiers:
    num_classes = {"speaker": len(data.speakers)}
    if data.train.digit is not None:
        num_classes["digit"] = 10
    return Classifiers(num_classes)


def train_classifiers(args, run: training.Run, env, data: Speech):
    """Speaker (and digit) classifiers on log-mel features of real training clips, shifted at random
    and with a little white noise added."""
    classifiers = make_classifiers(data).to(env.device)
    length = clip_length(args, data)
    with torch.no_grad():  # feature normalisation from a fixed sample of training clips
        sample = log_mel(fixed_length(data.train.audio[::max(1, len(data.train.audio) // 256)], length), data.sample_rate)
        for clf in classifiers.heads.values():
            clf.mean.copy_(sample.mean((0, 2))[:, None])
            clf.std.copy_(sample.std((0, 2))[:, None])
    optimizer = torch.optim.Adam(classifiers.parameters(), lr=1e-3)
    train, batch = data.train, min(32, len(data.train.audio) // env.world_size)  # per process

    def loss_fn(model, step):
        idx = training.batch_indices(step, len(train.audio), batch, args.seed + 1, env).numpy()
        gen = crop_generator(args.seed + 1, step, env.rank)
        x = random_crops([train.audio[i] for i in idx], length, gen)
        # White noise at a random level up to 0.1 x the clip's RMS (20 dB or more below it), so that
        # the classifiers judge generated audio (which has a noise floor) by its content rather than
        # by its noise. Louder noise (0-30 dB below the clip) made them worse on clean clips and no
        # better at hearing the digit in generated audio.
        x = add_white_noise(x, 20 - 20 * torch.rand(len(x), 1, generator=gen).log10(), gen)
        features = log_mel(x.to(env.device), data.sample_rate)
        labels = {"speaker": train.speaker[idx], "digit": None if train.digit is None else train.digit[idx]}
        losses = {f"{k}_loss": F.cross_entropy(logits, torch.from_numpy(labels[k]).to(env.device))
                  for k, logits in model(features).items()}
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}

    history = training.run_loop("classifiers", classifiers, optimizer, loss_fn, args.clf_steps, run, env)
    return classifiers, history


def clip_codes(model, clips: list[np.ndarray], length: int, device) -> torch.Tensor:
    """(N, length / 64) codes of the first `length` samples of each clip (silence after its end)."""
    return torch.from_numpy(np.stack(encode_clips(model, list(fixed_length(clips, length).numpy()), device)))


def train_prior(args, run: training.Run, env, model, vqvae_id: str, data: Speech):
    """The prior p(z | speaker): a WaveNet over the codes of each training clip's first --clip-seconds
    (--prior-channels, --prior-num-layers, --prior-cycle; skip channels twice the channels)."""
    if (run.out / "prior.pt").exists():
        training.check_prior_matches(training.load_checkpoint(run.out / "prior.pt"), vqvae_id)
    codes = clip_codes(model, data.train.audio, clip_length(args, data), env.device)
    speaker = torch.from_numpy(data.train.speaker)
    config = training.config_from_args(vqvae.WaveNetConfig, args, "prior_", num_classes=model.config.num_embeddings,
                                       cond_channels=0, num_speakers=len(data.speakers),
                                       skip_channels=2 * args.prior_channels)
    prior = vqvae.WaveNet(config).to(env.device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=args.prior_lr)

    def loss_fn(ddp, step):
        idx = training.batch_indices(step, len(codes), args.prior_batch_size, args.seed + 2, env)
        z = codes[idx].to(env.device)
        loss = F.cross_entropy(ddp(z, None, speaker[idx].to(env.device)), z)   # nats per code
        return loss, {"prior_loss": loss.detach()}

    history = training.run_loop("prior", prior, optimizer, loss_fn, args.prior_steps, run, env, {"vqvae_id": vqvae_id})
    return prior, history


def add_white_noise(x: torch.Tensor, snr_db: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Waveforms (B, T) plus white noise snr_db (a float or (B, 1)) decibels below each one's mean power."""
    power = x.pow(2).mean(1, keepdim=True)
    return x + torch.randn(x.shape, generator=generator) * (power * 10 ** (-torch.as_tensor(snr_db) / 10)).sqrt()


def clip_length(args, data: Speech) -> int:
    return max(HOP, round(args.clip_seconds * data.sample_rate / HOP) * HOP)


@torch.no_grad()
def class_probs(classifiers, x: torch.Tensor, rate: int, length: int) -> dict[str, torch.Tensor]:
    """Waveforms (B, T) -> (B, classes) probabilities per classifier, on the first `length` samples."""
    x = F.pad(x, (0, max(0, length - x.shape[1])))[:, :length]
    return {k: logits.softmax(1).cpu() for k, logits in classifiers.eval()(log_mel(x, rate)).items()}


def classify(classifiers, x: torch.Tensor, rate: int, length: int) -> dict[str, np.ndarray]:
    """Waveforms (B, T) -> predicted class per classifier, on the first `length` samples."""
    return {k: p.argmax(1).numpy() for k, p in class_probs(classifiers, x, rate, length).items()}


@torch.no_grad()
def encode_clips(model, clips: list[np.ndarray], device, batch_size: int = 64) -> list[np.ndarray]:
    """Codes of whole clips (each padded with silence to a multiple of 64 samples), one array per clip."""
    order, codes = np.argsort([len(c) for c in clips]), [None] * len(clips)
    for i in range(0, len(clips), batch_size):
        chosen = order[i:i + batch_size]
        length = -(-max(len(clips[j]) for j in chosen) // HOP) * HOP
        levels = vqvae.mu_law_encode(fixed_length([clips[j] for j in chosen], length)).to(device)
        indices = model.quantizer(model.encode(levels)).indices.cpu().numpy()
        for row, j in enumerate(chosen):
            codes[j] = indices[row, :-(-len(clips[j]) // HOP)]
    return codes


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
        labels = [frame_phones(split.names[i], len(c), data.sample_rate, data.alignments, phones) for i, c in zip(keep, codes)]
        codes, labels = np.concatenate(codes), np.concatenate(labels)
        stats[part] = (codes[labels >= 0], labels[labels >= 0])
    counts = np.zeros((K, len(phones)), np.int64)
    np.add.at(counts, stats["train"], 1)
    majority = int(np.bincount(stats["train"][1], minlength=len(phones)).argmax())
    mapping = np.where(counts.sum(1) > 0, counts.argmax(1), majority)          # unseen codes: majority
    codes, labels = stats["test"]
    return {"accuracy": float((mapping[codes] == labels).mean()), "majority_accuracy": float((labels == majority).mean()),
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
        quantizer = random_model.quantizer
        quantizer.kmeans_init = True
        quantizer.initialized.fill_(False)
        quantizer.train()(z_e)
        quantizer.eval()
    results["random_encoder_kmeans"] = phone_probe(random_model, data, device)["accuracy"]
    return results


@torch.no_grad()
def real_clip_scores(classifiers, test: Split, rate: int, length: int, seed: int, device) -> dict:
    """The classifiers on all real test clips, clean and with white noise 10 dB below them: how well
    they work, and how well through noise, before they judge generated audio."""
    real = fixed_length(test.audio, length)
    labels = {"speaker": test.speaker, "digit": test.digit}
    metrics = {}
    for suffix, x in (("", real), ("_10db", add_white_noise(real, 10.0, torch.Generator().manual_seed(seed)))):
        for k, probs in class_probs(classifiers, x.to(device), rate, length).items():
            metrics[f"real_test_{k}_accuracy{suffix}"] = float((probs.argmax(1).numpy() == labels[k]).mean())
            metrics[f"real_test_{k}_confidence{suffix}"] = probs.max(1).values.mean().item()
    return metrics


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
    picks = np.sort(np.concatenate([rng.permutation(np.flatnonzero(test.speaker == s))[:per_speaker] for s in range(S)]))
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
def reconstruct_and_convert(model, classifiers, data: Speech, clips: EvalClips, length: int, seed: int,
                            temperature: float) -> tuple[dict, EvalWaves]:
    """The teacher-forced test loss of the eval clips; their codes decoded by the WaveNet as their
    own speaker and as the target speaker (timed), and the classifiers' scores of both."""
    o = model(clips.levels, clips.source)
    metrics = {"test_recon_nats_per_sample": o.recon_loss.item(), "test_perplexity": o.perplexity.item()}
    n = len(clips.picks)
    print(f"[eval] generating {2 * n} clips of {clips.length} samples (reconstructions and conversions)", flush=True)
    t0 = time.perf_counter()
    gen = torch.Generator(device=clips.levels.device).manual_seed(seed)
    generated = model.decode(o.indices.repeat(2, 1), torch.cat([clips.source, clips.target]), generator=gen,
                             temperature=temperature)
    metrics["generation_seconds"] = time.perf_counter() - t0
    metrics["generated_samples_per_second"] = generated.numel() / metrics["generation_seconds"]
    # Past a clip's end the original is padded with zeros; so is what was generated there.
    waves = vqvae.mu_law_decode(generated).cpu() * clips.inside.repeat(2, 1)
    waves = EvalWaves(vqvae.mu_law_decode(clips.levels).cpu() * clips.inside, waves[:n], waves[n:])
    metrics.update(generated_clip_scores(classifiers, data, clips, waves, length))
    return metrics, waves


def generated_clip_scores(classifiers, data: Speech, clips: EvalClips, waves: EvalWaves, length: int) -> dict:
    """How often the classifiers hear the source speaker in the reconstructions, the target speaker
    (and the source) in the conversions, and, with digits, the clip's digit in both."""
    device, rate, digit = clips.levels.device, data.sample_rate, data.test.digit
    recon_probs = class_probs(classifiers, waves.reconstruction.to(device), rate, length)
    pr = {k: p.argmax(1).numpy() for k, p in recon_probs.items()}
    pc = classify(classifiers, waves.conversion.to(device), rate, length)
    src, tgt = clips.source.cpu().numpy(), clips.target.cpu().numpy()
    metrics = {"reconstruction_speaker_accuracy": float((pr["speaker"] == src).mean()),
               "conversion_target_speaker_rate": float((pc["speaker"] == tgt).mean()),
               "conversion_source_speaker_rate": float((pc["speaker"] == src).mean())}
    if "digit" in pr:
        metrics["reconstruction_digit_accuracy"] = float((pr["digit"] == digit[clips.picks]).mean())
        metrics["conversion_digit_kept_rate"] = float((pc["digit"] == digit[clips.picks]).mean())
        metrics["reconstruction_digit_confidence"] = recon_probs["digit"].max(1).values.mean().item()
    metrics["num_eval_clips"], metrics["speaker_chance"] = len(clips.picks), 1 / len(data.speakers)
    return metrics


def write_eval_files(out: Path, data: Speech, clips: EvalClips, waves: EvalWaves, wav_clips: int) -> None:
    """WAVs (original, reconstruction, conversion) of the first eval clip of each of the first
    wav_clips speakers, and spectrograms of up to four of them."""
    test, rate = data.test, data.sample_rate
    src, tgt = clips.source.cpu().numpy(), clips.target.cpu().numpy()
    shown = [int(np.flatnonzero(src == s)[0]) for s in range(len(data.speakers)) if (src == s).any()][:wav_clips]
    for j in shown:
        name, n = test.names[clips.picks[j]], min(len(test.audio[clips.picks[j]]), clips.length)
        write_wav(out / "audio" / f"{name}_original.wav", waves.original[j, :n].numpy(), rate)
        write_wav(out / "audio" / f"{name}_reconstruction.wav", waves.reconstruction[j, :n].numpy(), rate)
        write_wav(out / "audio" / f"{name}_as_{data.speakers[tgt[j]]}.wav", waves.conversion[j, :n].numpy(), rate)
    rows = [(test.names[clips.picks[j]], [("original", waves.original[j]), ("reconstruction", waves.reconstruction[j])])
            for j in shown[:4]]
    plot_spectrograms(out / "reconstructions.png", rows, rate, "held-out clips and their reconstructions")
    rows = [(test.names[clips.picks[j]], [("original", waves.original[j]),
                                          (f"as {data.speakers[tgt[j]]}", waves.conversion[j])]) for j in shown[:4]]
    plot_spectrograms(out / "conversion.png", rows, rate, "speaker conversion: codes of one speaker, decoded as another")


def phone_probe_scores(out: Path, seed: int, model, data: Speech, device) -> dict:
    """The phone probe of the trained encoder, against the majority phone and two random encoders
    (random_encoder_probes); draws code_phone.png."""
    print("[eval] phone probe: trained encoder, random encoder, random encoder + k-means codebook", flush=True)
    probe = phone_probe(model, data, device)
    metrics = {"phone_accuracy": probe["accuracy"], "phone_majority_accuracy": probe["majority_accuracy"],
               "phone_num_test_frames": probe["num_test_frames"]}
    for k, v in random_encoder_probes(seed, data, model.config, device).items():
        metrics[f"phone_accuracy_{k}"] = v
    plot_code_phone(out / "code_phone.png", probe)
    return metrics


@torch.no_grad()
def evaluate(args, env, model, classifiers, data: Speech) -> dict:
    """Classifiers on real clips, teacher-forced test loss, reconstructions and conversions with
    their classifier scores, WAVs and spectrograms, and (with alignments) the phone probe."""
    length = clip_length(args, data)
    metrics = real_clip_scores(classifiers, data.test, data.sample_rate, length, args.seed, env.device)
    clips = choose_eval_clips(data.test, len(data.speakers), args.eval_clips, length, args.seed, env.device)
    scores, waves = reconstruct_and_convert(model, classifiers, data, clips, length, args.seed, args.temperature)
    metrics.update(scores)
    write_eval_files(args.out, data, clips, waves, args.wav_clips)
    if data.alignments is not None:
        metrics.update(phone_probe_scores(args.out, args.seed, model, data, env.device))
    return metrics


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


@torch.no_grad()
def evaluate_prior(args, env, model, prior, classifiers, data: Speech) -> dict:
    """The prior's test bits per code (against the codes' unigram frequencies), and samples from it:
    codes sampled for each speaker, decoded by the VQ-VAE's WaveNet, judged by the classifiers."""
    device, rate, length, S = env.device, data.sample_rate, clip_length(args, data), len(data.speakers)
    metrics = prior_bits_per_code(model, prior, data, length, device)
    per_speaker = max(1, args.eval_clips // S)
    print(f"[eval] sampling {per_speaker * S} code sequences from the prior and decoding them", flush=True)
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    who = torch.arange(S, device=device).repeat_interleave(per_speaker)
    codes = prior.sample(None, who, generator=gen, temperature=args.temperature, length=length // HOP)
    waves = vqvae.mu_law_decode(model.decode(codes, who, generator=gen, temperature=args.temperature)).cpu()
    probs = class_probs(classifiers, waves.to(device), rate, length)
    metrics["prior_sample_speaker_rate"] = float((probs["speaker"].argmax(1) == who.cpu()).float().mean())
    if "digit" in probs:  # how sure the digit classifier is (mean top probability): low on babble
        metrics["prior_sample_digit_confidence"] = probs["digit"].max(1).values.mean().item()
    metrics["num_prior_samples"] = len(codes)
    write_prior_samples(args.out, data, waves, per_speaker, args.wav_clips)
    return metrics


def write_prior_samples(out: Path, data: Speech, waves: torch.Tensor, per_speaker: int, wav_clips: int) -> None:
    """The prior's samples (per_speaker of each speaker in turn): a WAV of the first of each of the
    first wav_clips speakers, spectrograms of up to three of each of the first four."""
    rate, firsts = data.sample_rate, list(range(0, len(waves), per_speaker))
    for s, j in enumerate(firsts[:wav_clips]):
        write_wav(out / "audio" / f"prior_sample_{data.speakers[s]}.wav", waves[j].numpy(), rate)
    rows = [(data.speakers[s], [(f"sample {k + 1}", waves[j + k]) for k in range(min(3, per_speaker))])
            for s, j in enumerate(firsts[:4])]
    plot_spectrograms(out / "prior_samples.png", rows, rate, "samples of the prior: codes sampled, then decoded")


# ============================================================================ figures
def plot_spectrograms(path: Path, rows, rate: int, title: str) -> None:
    """One row per clip, one log-mel panel per (label, waveform) of that row: time in seconds
    across, the 40 mel bands from low to high frequency up."""
    plt = training.pyplot()
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_code_phone(path: Path, probe: dict, num_codes: int = 60) -> None:
    """P(phone | code) on training frames for the most used codes, grouped by their mapped phone."""
    plt = training.pyplot()
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_data(args) -> Speech:
    """The corpus of --data, with the chosen subsets of its train and test splits."""
    try:
        data = load_speech(args.data, args.sample_rate, args.max_clips_per_speaker, args.data_dir)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    data.train = subset(data.train, args.max_train_clips, args.seed)
    data.test = subset(data.test, args.max_test_clips, args.seed)
    return data


def load_vqvae(out: Path, speakers: list[str], device):
    """The trained audio VQ-VAE of <out>/vqvae.pt in eval mode, its history and its fingerprint;
    refused if it was trained on other speakers."""
    model, state = training.load_model(out / "vqvae.pt", device)
    if not isinstance(model, vqvae.AudioVQVAE):
        raise SystemExit(f"{out}/vqvae.pt holds a {type(model).__name__}, not an audio VQ-VAE: train into "
                         "another --out")
    if state["speakers"] != speakers:
        raise SystemExit(f"{out}/vqvae.pt was trained on other speakers: {state['speakers']}")
    return model, state["history"], training.model_fingerprint(state)


def train_or_load_classifiers(args, run: training.Run, env, data: Speech) -> Classifiers:
    """The classifiers: trained in the classifiers stage, else those of <out>/classifiers.pt."""
    if "classifiers" in args.stages:
        classifiers, history = train_classifiers(args, run, env, data)
        if history is None:
            training.stopped()
        return classifiers
    if not (run.out / "classifiers.pt").exists():
        raise SystemExit(f"{run.out}/classifiers.pt not found: run the classifiers stage first")
    classifiers = make_classifiers(data).to(env.device)
    classifiers.load_state_dict(training.load_checkpoint(run.out / "classifiers.pt")["model"])
    return classifiers


def train_or_load_prior(args, run: training.Run, env, model, vqvae_id: str, data: Speech):
    """(prior, history): trained in the prior stage, else for eval that of <out>/prior.pt if there
    is one (refused if fitted to another VQ-VAE), else (None, None)."""
    if "prior" in args.stages:
        prior, history = train_prior(args, run, env, model, vqvae_id, data)
        if history is None:
            training.stopped()
        return prior, history
    if "eval" in args.stages and (run.out / "prior.pt").exists():
        return training.load_prior(run.out / "prior.pt", vqvae_id, env.device)
    return None, None


def main(argv=None) -> None:
    args = parse_args(argv)
    run, env = training.start(args)
    data = load_data(args)
    if env.is_main:
        seconds = sum(len(a) for a in data.train.audio) / data.sample_rate
        print(f"speech: {len(data.train.audio)} train clips ({seconds / 60:.1f} min) / {len(data.test.audio)} test; "
              f"{len(data.speakers)} speakers; {data.sample_rate} Hz; preset {args.preset}; device {env.device} x "
              f"{env.world_size}; quantizer {vqvae.quantizer_backend(env.device)}; out {args.out}", flush=True)
    t0, timings = time.perf_counter(), {}

    if "vqvae" in args.stages:
        if train_vqvae(args, run, env, data)[1] is None:
            training.stopped()
        timings["vqvae_seconds"] = time.perf_counter() - t0
    model, vqvae_history, vqvae_id = load_vqvae(args.out, data.speakers, env.device)

    if "classifiers" in args.stages or "eval" in args.stages:
        t1 = time.perf_counter()
        classifiers = train_or_load_classifiers(args, run, env, data)
        if "classifiers" in args.stages:
            timings["classifier_seconds"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    prior, prior_history = train_or_load_prior(args, run, env, model, vqvae_id, data)
    if "prior" in args.stages:
        timings["prior_seconds"] = time.perf_counter() - t1

    # Evaluation runs in the main process alone: end the process group first, so that nothing in it
    # (the k-means fit of the random-encoder probe broadcasts in a group) waits for the other ranks.
    training.teardown()
    if "eval" in args.stages and env.is_main:
        t2 = time.perf_counter()
        metrics = evaluate(args, env, model, classifiers, data)
        if prior is not None:
            metrics.update(evaluate_prior(args, env, model, prior.eval(), classifiers, data))
            training.plot_history(args.out / "prior_curves.png", prior_history, ["prior_loss"], "speech prior training")
        training.plot_history(args.out / "vqvae_curves.png", vqvae_history,
                              ["loss", "recon_loss", "commitment_loss", "perplexity"], "audio VQ-VAE training")
        timings["eval_seconds"] = time.perf_counter() - t2
        training.write_report(run, metrics, model.config, time.perf_counter() - t0, timings, env, speakers=data.speakers,
                              sample_rate=data.sample_rate, num_train_clips=len(data.train.audio))


if __name__ == "__main__":
    training.run_main(main)
