"""Speech corpora: FSDD and VCTK read into clips with their speakers (and digits and phone
alignments), decoded once into a cache keyed by the source's content; WAV files; band-limited
resampling; fixed-length windows and random crops of clips."""
from __future__ import annotations

import functools
import json
import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lab.files import DataError, load_npz, save_npz, seeded_subset, write_atomically
from lab.guards import check_writable, source_key

VCTK_URL = "https://datashare.ed.ac.uk/handle/10283/3443"
HOP = 64  # samples per code: the audio encoder's 6 stride-2 convolutions


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
        """(B, length) float: a random window of each clip of `indices`; a shorter clip lands at a
        random offset in silence."""
        out = torch.zeros(len(indices), length)
        for b, i in enumerate(indices):
            clip = torch.from_numpy(self.audio[int(i)])
            shift = int(torch.randint(abs(len(clip) - length) + 1, (), generator=generator))
            if len(clip) >= length:
                out[b] = clip[shift:shift + length]
            else:
                out[b, shift:shift + len(clip)] = clip
        return out


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
    if not np.isfinite(x).all():   # a float WAV can hold NaN or Inf, which would silently train on NaN
        raise DataError(f"{path}: holds {int((~np.isfinite(x)).sum())} NaN or infinite samples; repair or remove it")
    return x.mean(1), rate


def write_wav(path: Path, x: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV of x in [-1, 1] (clipped), creating the folder."""
    def write(tmp):
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes((np.clip(x, -1, 1) * 32767).round().astype("<i2").tobytes())
    write_atomically(path, write)


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
