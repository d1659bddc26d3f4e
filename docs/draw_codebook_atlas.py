"""A codebook atlas: what each code of a trained image VQ-VAE looks like when decoded, the codes
ordered by how often the test images use them.

For each code k the decoder is given a map filled with k (every latent of the 8x8 map the same
code), so each tile shows the texture or colour that code stands for on its own. The codes are
ranked by their share of the test images' latents; the label of each row gives the share of all
test latents that its codes take.

    python train_cifar.py                                          # a run to draw from
    python docs/draw_codebook_atlas.py --run runs/cifar_quick      # writes docs/codebook_atlas.png

--data and --data-dir default to those the run was trained with (recorded in its vqvae.pt).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures, images, runs  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    images.add_run_options(parser, "codebook_atlas.png")
    parser.add_argument("--max-test-images", type=int, default=None, help="a seeded subset of the test set")
    parser.add_argument("--codes", type=int, default=128, help="how many of the most used codes to draw")
    parser.add_argument("--per-row", type=int, default=16)
    args = parser.parse_args(argv)

    model, _ = runs.load_run(args.run)
    test = images.load_images_of_run(args, args.max_test_images)
    with torch.no_grad():
        codes = images.encode(model, test["test_x"], "cpu")                     # (N, 8, 8)
        K = model.config.num_embeddings
        counts = torch.bincount(codes.flatten(), minlength=K)
        order = counts.argsort(descending=True)[:min(args.codes, K)]
        maps = order[:, None, None].expand(len(order), *codes.shape[1:])       # (n, 8, 8), each one code
        tiles = (model.decode(maps) + 0.5).clamp(0, 1)                         # (n, C, 32, 32)
    n, C, H, W = tiles.shape
    rows = -(-n // args.per_row)
    grid = np.ones((rows * (H + 2), args.per_row * (W + 2), 3))
    for i, tile in enumerate(tiles.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, args.per_row)
        grid[r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = tile if C == 3 else tile[..., :1]
    share = counts[order].double() / counts.sum()
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(args.per_row * 0.42 + 1.6, rows * 0.42 + 0.6))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (H + 2) + H / 2 for r in range(rows)],
                  [f"ranks {r * args.per_row + 1}-{min(n, (r + 1) * args.per_row)}: "
                   f"{100 * share[r * args.per_row:(r + 1) * args.per_row].sum():.1f}%" for r in range(rows)], fontsize=7)
    used = int((counts > 0).sum())
    ax.set_title(f"the {n} most used of {K} codes ({used} used by {len(codes)} test images), each decoded from a "
                 f"map of that code alone", fontsize=8)
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    from PIL import Image  # a 128-colour palette keeps the PNG small
    Image.open(args.out).convert("RGB").quantize(128).save(args.out, optimize=True)
    print(f"wrote {args.out}: codes ranked by test-set use; the first {n} take {100 * share.sum():.1f}% of the latents")


if __name__ == "__main__":
    main()
