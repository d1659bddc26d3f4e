"""What happens to a code that is never chosen, under the EMA codebook of Appendix A.1: its norm
over training steps, at decay 0.99 (the paper's) and 0.9, with epsilon = 1e-5.

The simulation runs vqvae.VectorQuantizer itself (decay gamma, no k-means, no restarts). Each
step's batch of latents sits exactly on codes 1..K-1, so every code but code 0 is chosen and stays
where it is; code 0, never chosen, keeps its random start while gamma^t >> epsilon and then
falls to the origin, near t = ln(epsilon) / ln(gamma).

    python docs/draw_dead_code_norm.py             # writes docs/dead_code_norm.png
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures  # noqa: E402
import vqvae  # noqa: E402


def never_chosen_norm(decay: float, steps: int, num_codes: int, dim: int, batch: int, seed: int) -> list[float]:
    """The norm of code 0 after each of `steps` EMA updates in which it is never chosen."""
    torch.manual_seed(seed)
    vq = vqvae.VectorQuantizer(num_codes, dim, decay=decay, dead_code_threshold=None).train()   # the paper's
    norms = [vq.codebook[0].norm().item()]
    for _ in range(steps):
        others = vq.codebook[1:].clone()                                   # (K - 1, D)
        picks = others[torch.arange(batch * 64) % len(others)]              # latents on codes 1..K-1
        out = vq(picks.T.reshape(1, dim, batch * 64, 1))                    # (B=1, D, N, 1)
        assert not (out.codes == 0).any()
        norms.append(vq.codebook[0].norm().item())
    return norms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("dead_code_norm.png"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--num-codes", type=int, default=512, help="K")
    parser.add_argument("--dim", type=int, default=64, help="D")
    parser.add_argument("--batch", type=int, default=32, help="images of 8x8 latents per step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for decay, color in ((0.99, "tab:blue"), (0.9, "tab:orange")):
        norms = never_chosen_norm(decay, args.steps, args.num_codes, args.dim, args.batch, args.seed)
        turn = math.log(1e-5) / math.log(decay)                             # gamma^t = epsilon
        at = min(int(turn), args.steps)
        print(f"decay {decay}: norm {norms[0]:.2f} at step 0, {norms[at]:.2f} at step {at}, "
              f"{norms[-1]:.3f} at step {args.steps}")
        ax.plot(norms, color=color, label=f"decay {decay}")
        ax.axvline(turn, color=color, linestyle=":", linewidth=1)
        ax.text(turn, norms[0] * (0.25 if decay > 0.95 else 0.8), f" t = ln(1e-5) / ln({decay}) = {turn:.0f}",
                color=color, fontsize=7)
    ax.set_xlabel("training step (code 0 never chosen)")
    ax.set_ylabel("norm of code 0")
    ax.set_ylim(0, None)
    ax.set_title("A code never chosen keeps its start, then falls to the origin (epsilon 1e-5)", fontsize=9)
    ax.legend(fontsize=8, loc=(0.3, 0.12))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
