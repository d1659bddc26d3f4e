"""Speech: FSDD and VCTK read into clips with their speakers (and digits and phone alignments),
decoded once into a cache keyed by the source's content; log-mel features and the speaker and
digit classifiers that judge generated audio; and what the speech script measures, writes and
draws (SpeechEvaluation): the classifiers on real clips, reconstructions and speaker conversions,
the phone probe of Sec. 4.3 against random encoders, the prior's bits per code and its samples."""
from __future__ import annotations

import functools
import json
import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import vqvae
from lab.checkpoints import check_writable, load_checkpoint, load_npz, save_npz, seeded_subset, source_key
from lab.figures import pyplot
from lab.runs import DataError

VCTK_URL = "https://datashare.ed.ac.uk/handle/10283/3443"
HOP = 64  # samples per code: 6 stride-2 convolutions


# ============================================================================ data
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


@dataclass
class Split:
    audio: list[np.ndarray]      # float32 waveforms in [-1, 1]
    speaker: np.ndarray          # (N,) int64 index into Speech.speakers
    names: list[str]             # file stems
    digit: np.ndarray | None     # (N,) int64 spoken digit (FSDD), else None

    def random_crops(self, indices, length: int, generator: torch.Generator) -> torch.Tensor:
        """(B, length) float: a random window of each clip of `indices` (see random_crops)."""
        return random_crops([self.audio[int(i)] for i in indices], length, generator)


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
    """Mono 16-bit PCM WAV of x in [-1, 1] (clipped), creating the folder."""
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

    return Speech(8000, speakers, split(False), split(True), read_alignments(root / "alignments.tsv"))


def read_alignments(path: Path) -> dict[str, list[tuple[str, float, float]]] | None:
    """FSDD's alignments.tsv (file, speaker, digit, word, phone, start_s, end_s) as {stem: [(phone,
    start s, end s)]}, or None without the file."""
    if not path.exists():
        return None
    alignments = {}
    for number, line in enumerate(path.read_text().splitlines()[1:], start=2):
        try:
            name, _, _, _, phone, start, end = line.split("\t")
            interval = (phone, float(start), float(end))
        except ValueError as e:
            raise DataError(f"{path} line {number}: expected 7 tab-separated columns "
                            f"(file, speaker, digit, word, phone, start_s, end_s); got {line!r}") from e
        alignments.setdefault(Path(name).stem, []).append(interval)
    return alignments


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


def load_speech(source: Path | None, rate: int, max_per_speaker: int | None = None, data_dir: Path | None = None,
                max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> Speech:
    """FSDD or VCTK (see load_fsdd, load_vctk), with seeded random subsets of max_train / max_test
    clips (subset); with data_dir, decoded once and cached there as .npz, keyed by the folder's
    content and these settings (source_key). Raises DataError naming what is wrong."""
    if source is None:
        raise DataError(f"pass --data: an FSDD checkout or a VCTK folder (download VCTK from {VCTK_URL})")
    is_fsdd = (source / "recordings").is_dir()
    if not (is_fsdd or (source / "wav48").is_dir() or (source / "wav48_silence_trimmed").is_dir()):
        raise DataError(f"--data {source}: expected recordings/ (FSDD), wav48/ (VCTK 0.80) or "
                        "wav48_silence_trimmed/ (VCTK 0.92)")

    def load() -> Speech:
        return load_fsdd(source) if is_fsdd else load_vctk(source, rate, max_per_speaker)
    if data_dir is None:
        data = load()
    else:
        check_writable(data_dir)
        cache = data_dir / f"speech-{source.name}-{source_key(source, rate, max_per_speaker)}.npz"
        arrays = load_npz(cache, keys=("sample_rate", "speakers", "alignments", "train_audio", "test_audio"))
        if arrays is not None:
            data = speech_from_arrays(arrays)
        else:
            data = load()
            save_npz(cache, speech_arrays(data))
    data.train, data.test = subset(data.train, max_train, seed), subset(data.test, max_test, seed)
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
    """The Speech of speech_arrays."""
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
    """A seeded random n of the split's clips, in their order (all of them if n is None or larger)."""
    keep = seeded_subset(len(split.audio), n, seed)
    if keep is None:
        return split
    return Split([split.audio[i] for i in keep], split.speaker[keep], [split.names[i] for i in keep],
                 None if split.digit is None else split.digit[keep])


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
    The judges of the speech script's eval: they hear who speaks (and which digit) in generated audio."""

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
        for clf in self.heads.values():
            clf.mean.copy_(sample.mean((0, 2))[:, None])
            clf.std.copy_(sample.std((0, 2))[:, None])
        return self

    @staticmethod
    def training_examples(split: Split, idx: np.ndarray, length: int, rate: int, generator: torch.Generator,
                          device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(log-mel features, {label: classes}) on `device` of the clips idx of `split`: random crops
        of `length` samples with white noise at a random level 20 dB or more below each crop.
        Why the noise: the classifiers then judge generated audio (which has a noise floor) by its
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


def classify(classifiers, x: torch.Tensor, rate: int, length: int) -> dict[str, np.ndarray]:
    """Waveforms (B, T) -> predicted class per classifier, on the first `length` samples."""
    return {k: p.argmax(1).numpy() for k, p in class_probs(classifiers, x, rate, length).items()}


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
        quantizer = random_model.quantizer
        quantizer.kmeans_init = True
        quantizer.initialized.fill_(False)
        quantizer.train()(z_e)
        quantizer.eval()
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


class SpeechEvaluation:
    """What the speech script's eval stage measures with the classifiers on the test clips of
    `data` (each judged on its first `length` samples), writing WAVs to <out>/audio and figures to
    <out>: the classifiers on real clips, the reconstructions and conversions of chosen clips, the
    phone probe, the prior's bits per code and its samples."""

    def __init__(self, classifiers: Classifiers, data: Speech, length: int, out: Path, device):
        self.classifiers, self.data, self.length, self.out, self.device = classifiers, data, length, out, device

    def real_clips(self, seed: int) -> dict:
        """The classifiers on every real test clip, clean and through noise (real_clip_scores)."""
        return real_clip_scores(self.classifiers, self.data.test, self.data.sample_rate, self.length, seed,
                                self.device)

    def choose_clips(self, eval_clips: int, seed: int) -> EvalClips:
        """About eval_clips test clips, as many of each speaker, each with another speaker to be
        converted to (choose_eval_clips)."""
        return choose_eval_clips(self.data.test, len(self.data.speakers), eval_clips, self.length, seed, self.device)

    def reconstructions_and_conversions(self, clips: EvalClips, generated: torch.Tensor, wav_clips: int) -> dict:
        """generated (2N, length) on the CPU: the clips' codes decoded as their own speaker, then as
        the target speaker. Their classifier scores; WAVs of the first clip of each of the first
        wav_clips speakers, and spectrograms."""
        n = len(clips.picks)
        generated = generated * clips.inside.repeat(2, 1)  # past a clip's end, zeros as in the original
        waves = EvalWaves(vqvae.mu_law_decode(clips.levels).cpu() * clips.inside, generated[:n], generated[n:])
        metrics = generated_clip_scores(self.classifiers, self.data, clips, waves, self.length)
        write_eval_files(self.out, self.data, clips, waves, wav_clips)
        return metrics

    def phone_probe(self, model, seed: int) -> dict:
        """The phone probe of the trained encoder, against the majority phone and two random
        encoders (random_encoder_probes, seeded by seed + 1); draws code_phone.png."""
        print("[eval] phone probe: trained encoder, random encoder, random encoder + k-means codebook", flush=True)
        probe = phone_probe(model, self.data, self.device)
        metrics = {"phone_accuracy": probe["accuracy"], "phone_majority_accuracy": probe["majority_accuracy"],
                   "phone_num_test_frames": probe["num_test_frames"]}
        for k, v in random_encoder_probes(seed, self.data, model.config, self.device).items():
            metrics[f"phone_accuracy_{k}"] = v
        plot_code_phone(self.out / "code_phone.png", probe)
        return metrics

    def prior_bits_per_code(self, model, prior) -> dict:
        """The prior's test bits per code, and the unigram's (prior_bits_per_code)."""
        return prior_bits_per_code(model, prior, self.data, self.length, self.device)

    def prior_samples(self, waves: torch.Tensor, speaker: torch.Tensor, per_speaker: int, wav_clips: int) -> dict:
        """waves (N, T) on the CPU: decoded samples of the prior, per_speaker of each speaker in turn
        (`speaker`). How often the classifiers hear the speaker, how sure the digit classifier is
        (low on babble); WAVs and spectrograms (write_prior_samples)."""
        probs = class_probs(self.classifiers, waves.to(self.device), self.data.sample_rate, self.length)
        metrics = {"prior_sample_speaker_rate": float((probs["speaker"].argmax(1) == speaker.cpu()).float().mean())}
        if "digit" in probs:
            metrics["prior_sample_digit_confidence"] = probs["digit"].max(1).values.mean().item()
        metrics["num_prior_samples"] = len(waves)
        write_prior_samples(self.out, self.data, waves, per_speaker, wav_clips)
        return metrics


# ============================================================================ files and figures
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
