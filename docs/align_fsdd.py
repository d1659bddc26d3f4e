"""The phone alignments of the Free Spoken Digit Dataset that the phone probe of train_vctk.py reads
(FSDD/alignments.tsv): forced alignment of each clip to its digit's word with PocketSphinx, an
optional dependency (pip install pocketsphinx==5.1.1, BSD; its English acoustic model and CMU
dictionary come with the wheel). The public FSDD repository has no alignments.

    python docs/align_fsdd.py ~/free-spoken-digit-dataset     # writes <that folder>/alignments.tsv

Each clip's transcript is its digit's word, from the file name; the model expects 16 kHz, so the
8 kHz clips are resampled (lab.speech.resample) first. The dictionary's variants of a word (zero:
Z IY R OW, Z IH R OW) are tried in turn until one aligns. Times are seconds of the clip, at the
aligner's 10 ms frames. A clip that aligns to no variant is left out, with a count at the end.
Columns: file, speaker, digit, word, phone, start_s, end_s.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import files, speech  # noqa: E402

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def align(decoder, pcm: bytes, word: str) -> list[tuple[str, str, float, float]]:
    """(word, phone, start s, end s) of each phone of `word` in the 16 kHz 16-bit clip `pcm`, or []."""
    def decode():
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
    decoder.set_align_text(word)
    decode()                       # the word's position in the clip
    decoder.set_alignment()
    decode()                       # then its phones
    return [(w.name.split("(")[0], p.name, p.start / 100, (p.start + p.duration) / 100)
            for w in decoder.get_alignment() for p in w]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fsdd", type=Path, help="an FSDD checkout (recordings/*.wav)")
    parser.add_argument("--out", type=Path, default=None, help="default: <fsdd>/alignments.tsv")
    args = parser.parse_args(argv)
    try:
        from pocketsphinx import Decoder
    except ImportError:
        raise SystemExit("the aligner is an optional dependency: pip install pocketsphinx==5.1.1") from None
    decoder = Decoder(samprate=16000, bestpath=False, loglevel="FATAL")
    rows, failed = ["file\tspeaker\tdigit\tword\tphone\tstart_s\tend_s"], []
    clips = sorted((args.fsdd / "recordings").glob("*.wav"))
    if not clips:
        raise SystemExit(f"{args.fsdd}/recordings: no .wav files")
    for path in clips:
        digit, speaker, _ = path.stem.split("_")
        x, rate = speech.read_wav(path)
        pcm = (np.clip(speech.resample(x, rate, 16000), -1, 1) * 32767).astype("<i2").tobytes()
        word = WORDS[int(digit)]
        for variant in (word, f"{word}(2)", f"{word}(3)"):
            try:
                phones = align(decoder, pcm, variant)
            except RuntimeError:   # a variant the dictionary lacks, or no alignment
                phones = []
            if any(w == word for w, *_ in phones):
                break
        else:
            failed.append(path.name)
            continue
        rows += [f"{path.name}\t{speaker}\t{digit}\t{w}\t{p}\t{start:.2f}\t{end:.2f}" for w, p, start, end in phones]
    out = args.out or args.fsdd / "alignments.tsv"
    files.write_atomically(out, lambda tmp: tmp.write_text("\n".join(rows) + "\n"))
    print(f"{out}: {len(rows) - 1} phones of {len(clips) - len(failed)} clips; {len(failed)} clips did not align"
          + (f" ({', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''})" if failed else ""))


if __name__ == "__main__":
    main()
