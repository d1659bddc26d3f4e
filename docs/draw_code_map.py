"""An image is 64 integers: test images of CIFAR-10 beside their reconstructions and their 8x8 maps of
codes, for a trained VQ-VAE.

Each row shows a test image, the decoder's reconstruction from its codes alone, and the map of codes
the encoder and quantizer chose (each cell's number is the index of its codebook entry in [0, K); the
colour is the index modulo 20, only to tell neighbouring codes apart). The images are one test image
of each of the first classes, so that the rows differ.

    python train_cifar.py                                      # a run to draw from
    python docs/draw_code_map.py --run runs/cifar_quick        # writes docs/code_map.png

--data and --data-dir default to those the run was trained with (recorded in its vqvae.pt).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures, images, runs  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    images.add_run_options(parser, "code_map.png")
    parser.add_argument("--images", type=int, default=4, help="how many test images (rows)")
    args = parser.parse_args(argv)

    model, _ = runs.load_run(args.run)
    test = images.load_images_of_run(args)
    # The first test image of each class in turn: rows of different content, the same every time.
    picks = [int((test["test_y"] == c).nonzero()[0]) for c in range(len(test["classes"]))
             if (test["test_y"] == c).any()][:args.images]
    x = images.to_float(test["test_x"][picks], "cpu")
    with torch.no_grad():
        codes = model.quantize(model.encode(x)).codes                               # (n, 8, 8)
        recon = model.decode(codes)
    if codes.dim() != 3:
        raise SystemExit(f"{args.run}: codes of shape {tuple(codes.shape[1:])}; this figure draws one code a position")

    plt = figures.pyplot()
    palette = plt.get_cmap("tab20")
    # White numbers on the palette's dark colours, black on the light ones.
    ink = ["white" if 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2] < 0.42 else "black" for c in palette.colors]
    n, (h, w) = len(picks), codes.shape[1:]
    fig, axes = plt.subplots(n, 3, figsize=(5.6, 1.9 * n + 0.5), gridspec_kw={"width_ratios": [1, 1, 1.2]},
                             squeeze=False)
    for r in range(n):
        for ax, picture, label in ((axes[r][0], x[r], "test image"), (axes[r][1], recon[r], "reconstruction")):
            picture = (picture + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(picture[..., 0] if picture.shape[2] == 1 else picture, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.axis("off")
            if r == 0:
                ax.set_title(label, fontsize=8)
        axes[r][0].text(-3, picture.shape[0] / 2, test["classes"][int(test["test_y"][picks[r]])], ha="right",
                        va="center", fontsize=8, rotation=90)
        ax = axes[r][2]
        ax.imshow(codes[r] % 20, cmap=palette, vmin=0, vmax=19, interpolation="nearest")
        for i, row in enumerate(codes[r].tolist()):
            for j, code in enumerate(row):
                ax.text(j, i, str(code), ha="center", va="center", fontsize=5.5, color=ink[code % 20])
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title(f"its {h}x{w} codes (indices in [0, {model.config.num_embeddings}))", fontsize=8)
    fig.suptitle(f"An image is {h * w} integers: the decoder rebuilds it from the codes alone", fontsize=9)
    fig.tight_layout()
    figures.save(fig, args.out)
    print(f"wrote {args.out}: {n} test images and their codes")


if __name__ == "__main__":
    main()
