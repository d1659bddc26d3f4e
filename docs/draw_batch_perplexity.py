"""Batch perplexity depends on the batch size: a code user that picks each of K = 512 codes
uniformly at random, whose true perplexity is 512, measured on simulated batches of 8x8 latents.

The perplexity printed during training is exp(entropy) of the code counts of one batch (the
plug-in estimate), which is biased low when a batch holds few latents per code.

    python docs/draw_batch_perplexity.py           # writes docs/batch_perplexity.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures  # noqa: E402


def batch_perplexity(num_latents: int, num_codes: int, trials: int, generator: torch.Generator) -> torch.Tensor:
    """(trials,) perplexities of batches of num_latents codes drawn uniformly from num_codes."""
    codes = torch.randint(num_codes, (trials, num_latents), generator=generator)
    counts = torch.zeros(trials, num_codes).scatter_add_(1, codes, torch.ones(trials, num_latents))
    p = counts / num_latents
    return torch.exp(torch.special.entr(p).sum(1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("batch_perplexity.png"))
    parser.add_argument("--num-codes", type=int, default=512, help="K")
    parser.add_argument("--latents-per-image", type=int, default=64, help="an 8x8 map of codes")
    parser.add_argument("--trials", type=int, default=200, help="simulated batches per batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    means, stds = [], []
    for b in sizes:
        ppl = batch_perplexity(b * args.latents_per_image, args.num_codes, args.trials, gen)
        means.append(ppl.mean().item())
        stds.append(ppl.std().item())
        print(f"batch {b:5d} images ({b * args.latents_per_image:6d} latents): perplexity {means[-1]:6.1f} "
              f"+- {stds[-1]:.1f}")
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.axhline(args.num_codes, color="gray", linestyle="--", linewidth=1)
    ax.text(sizes[0], args.num_codes * 1.02, f"true perplexity {args.num_codes} (every code equally likely)",
            fontsize=8, color="gray", va="bottom")
    ax.errorbar(sizes, means, yerr=stds, marker="o", markersize=4, capsize=2)
    i = sizes.index(32)
    ax.annotate(f"batch 32: {means[i]:.0f}", (sizes[i], means[i]), (sizes[i] * 2.5, means[i] - 110), fontsize=8,
                arrowprops=dict(arrowstyle="->", linewidth=0.8))
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, args.num_codes * 1.12)
    ax.set_xlabel(f"batch size (images of {args.latents_per_image} latents)")
    ax.set_ylabel("batch perplexity")
    ax.set_title(f"A uniform code user, K = {args.num_codes}: the batch perplexity reads low", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
