"""How stable are the video experiment's frame codes under motion? (docs/results/video.md)

Two measurements on a train_video.py run, printed as Markdown tables:

1. Held-out frames are shifted horizontally by s = 0..8 pixels (a window cut from the frame at
   another offset) and encoded again; each window's codes are compared with the unshifted window's
   codes moved by s // 4 cells. The encoder is convolutional with stride 4, so whole-cell shifts
   keep the codes; the table shows what a shift by a fraction of a cell does.
2. For the transitions of the training episodes, by action: the fraction of frame t+1's codes equal
   to frame t's codes moved by the horizontal shift (in cells) that matches best.

    python docs/video_code_stability.py --out runs/video_quick \\
        --data data/vizdoom_my_way_home_48+16x200_skip4_hold4_seed0.npz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import episodes, files, guards  # noqa: E402

WINDOW = 64      # pixels, a multiple of the 4-pixel cell
MARGIN = 8       # the windows start at MARGIN + s, s = 0..8


def equal_after_shift(later: torch.Tensor, earlier: torch.Tensor, cells: int) -> float:
    """Fraction of positions where later[..., j] == earlier[..., j + cells] (content moved left by
    `cells`; negative: right), over the columns both maps cover."""
    width = later.shape[-1]
    if cells >= 0:
        return (later[..., :width - cells] == earlier[..., cells:]).float().mean().item()
    return (later[..., -cells:] == earlier[..., :width + cells]).float().mean().item()


@torch.no_grad()
def subcell_shifts(model, frames: torch.Tensor) -> list[tuple[int, float]]:
    """(shift in pixels, fraction of codes kept) for shifts 0..8, on frames (N, 84, 84, 3) uint8."""
    x = episodes.frames_to_float(frames, "cpu")

    def codes(offset: int) -> torch.Tensor:
        return model.quantize(model.encode(x[..., MARGIN + offset:MARGIN + offset + WINDOW])).codes

    base, rows = codes(0), []
    for s in range(9):
        # Leave out the border cells, whose receptive field reaches the window's zero padding.
        rows.append((s, equal_after_shift(codes(s)[..., 1:-1], base[..., 1:-1], s // 4)))
    return rows


def consecutive_frames(codes: torch.Tensor, actions: torch.Tensor, max_cells: int = 6) -> list[tuple]:
    """Per action: (name, transitions, kept with no shift, best shift in cells, kept at that shift)."""
    rows = []
    for a, name in enumerate(episodes.ACTIONS):
        mask = actions == a
        earlier, later = codes[:, :-1][mask], codes[:, 1:][mask]
        kept = {c: equal_after_shift(later, earlier, c) for c in range(-max_cells, max_cells + 1)}
        best = max(kept, key=kept.get)
        rows.append((name, int(mask.sum()), kept[0], best, kept[best]))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="a train_video.py run folder (vqvae.pt, codes.pt)")
    p.add_argument("--data", type=Path, required=True, help="the run's cached episodes (.npz in its --data-dir)")
    p.add_argument("--frames", type=int, default=300, help="held-out frames for the shift table")
    args = p.parse_args(argv)
    model, state = files.load_model(args.out / "vqvae.pt")
    data = files.load_npz(args.data, keys=("train_actions", "train_seeds", "test_frames"))
    if data is None:
        raise SystemExit(f"--data: expected the .npz of collected episodes; {args.data} is missing or incomplete")
    codes = files.load_checkpoint(args.out / "codes.pt")
    # The codes must be this VQ-VAE's, of these episodes, or the actions pair with other frames.
    made_from = codes.get("made_from", {})
    if made_from.get("vqvae") != guards.model_fingerprint(state):
        raise SystemExit(f"{args.out / 'codes.pt'}: encoded by another VQ-VAE than {args.out / 'vqvae.pt'}")
    if not np.array_equal(np.asarray(made_from.get("train_seeds")), data["train_seeds"]):
        raise SystemExit(f"--data: expected the episodes {args.out / 'codes.pt'} was encoded from; {args.data} "
                         "holds others")
    frames = torch.from_numpy(np.ascontiguousarray(data["test_frames"][:, ::10].reshape(-1, 84, 84, 3)))

    print("| horizontal shift (pixels) | codes kept |\n|---|---|")
    for s, kept in subcell_shifts(model, frames[:args.frames]):
        print(f"| {s} | {kept:.1%} |")
    print("\n| action | transitions | codes kept, no shift | best shift (cells) | codes kept there |")
    print("|---|---|---|---|---|")
    actions = torch.from_numpy(data["train_actions"])
    for name, n, still, best, kept in consecutive_frames(codes["train"].long(), actions):
        print(f"| {name} | {n} | {still:.1%} | {best:+d} | {kept:.1%} |")


if __name__ == "__main__":
    main()
