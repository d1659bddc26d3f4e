"""What each stack of the gated PixelCNN prior sees, on a 5x5 kernel: TUTORIAL.md, section 9.

The patterns are not drawn by hand: the script builds vqvae.GatedLayer (one channel, random weights)
and marks every input position whose gradient reaches the output at the current position (i, j).
The vertical stack sees rows i-2..i, its own row included, so it enters the horizontal stack one
row down: the horizontal stack at (i, j) sees the full width of rows i-3..i-1 through the vertical
features of row i-1, and the pixels to its left through its own convolution (the first layer
without the current pixel, "mask A"; later layers with it, which by then holds only earlier pixels).
A last panel shows, by gradients of a 2-layer vqvae.GatedPixelCNN, that its logits at (i, j) depend
on exactly the earlier positions of its receptive field: no blind spot, and never a later position.
The script asserts that before drawing.

    python docs/draw_pixelcnn_masks.py              # writes docs/pixelcnn_masks.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures  # noqa: E402
import vqvae  # noqa: E402

K = 5            # kernel size
SIZE = 15        # side of the maps the gradients are taken on: large enough that nothing is clipped
I = J = 8        # the current position, far from every border


def layer_dependence(first: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean (SIZE, SIZE) maps of the input positions that one GatedLayer's outputs at (I, J) depend on:
    the vertical output on the vertical input, the horizontal output on the horizontal input and on the
    vertical input. Several random inputs, so that no dependence hides behind a zero gradient."""
    torch.manual_seed(seed)
    layer = vqvae.GatedLayer(channels=1, kernel_size=K, first=first, num_classes=None, cond_channels=0)
    v_seen, h_seen, h_from_v = (np.zeros((SIZE, SIZE), bool) for _ in range(3))
    for _ in range(4):
        v = torch.randn(1, 1, SIZE, SIZE, requires_grad=True)
        h = torch.randn(1, 1, SIZE, SIZE, requires_grad=True)
        v_out, h_out = layer(v, h)
        (grad_v,) = torch.autograd.grad(v_out[0, 0, I, J], v, retain_graph=True)
        grad_hh, grad_hv = torch.autograd.grad(h_out[0, 0, I, J], (h, v))
        v_seen |= grad_v[0, 0].numpy() != 0
        h_seen |= grad_hh[0, 0].numpy() != 0
        h_from_v |= grad_hv[0, 0].numpy() != 0
    return v_seen, h_seen, h_from_v


def network_dependence(num_layers: int = 2, seed: int = 0) -> np.ndarray:
    """Boolean (SIZE, SIZE) map of the positions whose embeddings the logits at (I, J) of a GatedPixelCNN
    depend on, by the gradient with respect to the embedding layer's output (taken by a forward hook)."""
    torch.manual_seed(seed)
    prior = vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(num_embeddings=16, channels=8, num_layers=num_layers,
                                                          kernel_size=K))
    embedded = []

    def keep(module, inputs, output):  # a leaf the gradient can be taken with respect to
        embedded.append(output.detach().requires_grad_())
        return embedded[-1]

    prior.embedding.register_forward_hook(keep)
    seen = np.zeros((SIZE, SIZE), bool)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(4):
        codes = torch.randint(0, 16, (1, SIZE, SIZE), generator=generator)
        logits = prior(codes)                                            # (1, 16, SIZE, SIZE)
        weights = torch.randn(16, generator=generator)                   # a random mix: no cancelling sum
        (grad,) = torch.autograd.grad((logits[0, :, I, J] * weights).sum(), embedded[-1])
        seen |= grad[0, 0].abs().sum(-1).numpy() != 0                    # (B, G, H, W, c) -> (H, W)
    return seen


def expected_field(num_layers: int) -> np.ndarray:
    """The earlier positions in raster order within the receptive field of num_layers layers: rows
    i-1-L*k//2 .. i-1 over columns j-L*k//2 .. j+L*k//2, and on row i the L*k//2 positions to the left."""
    r, c = np.mgrid[:SIZE, :SIZE]
    reach = num_layers * (K // 2)
    above = (r < I) & (I - r <= reach + 1) & (abs(c - J) <= reach)
    left = (r == I) & (c < J) & (J - c <= reach)
    return above | left


def box(rows: range, cols: range) -> np.ndarray:
    """Boolean (SIZE, SIZE) map of the rectangle rows x cols, relative to (I, J)."""
    out = np.zeros((SIZE, SIZE), bool)
    out[I + rows.start:I + rows.stop, J + cols.start:J + cols.stop] = True
    return out


def check(first: tuple, later: tuple, network: np.ndarray) -> None:
    """Assert what the figure draws: the windows of each stack for a 5x5 kernel (h = k//2 = 2), and
    that a 2-layer network sees exactly the earlier positions of its receptive field."""
    h = K // 2
    v_seen, h_first, v_first = first
    _, h_later, v_later = later
    assert (v_seen == box(range(-h, 1), range(-h, h + 1))).all(), "vertical stack: not rows i-2..i"
    assert (h_first == box(range(0, 1), range(-h, 0))).all(), "first horizontal stack: not j-2..j-1 (mask A)"
    assert (h_later == box(range(0, 1), range(-h, 1))).all(), "later horizontal stack: not j-2..j"
    for seen in (v_first, v_later):   # the vertical features of row i-1, shifted down
        assert (seen == box(range(-h - 1, 0), range(-h, h + 1))).all(), "horizontal stack: not rows i-3..i-1"
    assert (network == expected_field(2)).all(), "a 2-layer GatedPixelCNN sees other than the earlier positions"


def draw_grid(ax, layers: list[tuple[np.ndarray, str]], rows: range, cols: range, title: str) -> None:
    """The window rows x cols (relative to (I, J)) as a grid of cells, each boolean map of layers
    shaded in its colour, the current position outlined in red."""
    from matplotlib.colors import to_rgb
    image = np.ones((len(rows), len(cols), 3))
    for seen, color in layers:
        image[seen[I + rows.start:I + rows.stop, J + cols.start:J + cols.stop]] = to_rgb(color)
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks(np.arange(len(cols) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(rows) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.6", linewidth=0.6)
    ax.tick_params(which="both", length=0)
    ax.set_xticks(range(len(cols)), [f"j{d:+d}" if d else "j" for d in cols], fontsize=6)
    ax.set_yticks(range(len(rows)), [f"i{d:+d}" if d else "i" for d in rows], fontsize=6)
    ax.add_patch(figures.pyplot().Rectangle((-cols.start - 0.5, -rows.start - 0.5), 1, 1, fill=False,
                                            edgecolor="red", linewidth=2))
    ax.set_title(title, fontsize=8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("pixelcnn_masks.png"))
    args = parser.parse_args(argv)
    first, later, network = layer_dependence(first=True), layer_dependence(first=False), network_dependence(2)
    check(first, later, network)
    (v_seen, h_first, v_first), (_, h_later, v_later) = first, later
    vertical, own_row, whole = "#9ecae1", "#fdae6b", "#a1d99b"

    plt = figures.pyplot()
    small, large = (range(-3, 2), range(-2, 3)), (range(-6, 2), range(-5, 6))
    fig, axes = plt.subplots(1, 4, figsize=(10.5, 3.1), gridspec_kw={"width_ratios": [5, 5, 5, 11]})
    draw_grid(axes[0], [(v_seen, vertical)], *small, "vertical stack\n(rows i-2..i: enters the horizontal\n"
              "stack one row down)")
    draw_grid(axes[1], [(v_first, vertical), (h_first, own_row)], *small, "horizontal stack, first layer\n(mask A)")
    draw_grid(axes[2], [(v_later, vertical), (h_later, own_row)], *small, "horizontal stack, later layers\n"
              "(its input at (i, j) holds earlier pixels only)")
    draw_grid(axes[3], [(network, whole)], *large, "2 layers (vqvae.GatedPixelCNN): the logits at (i, j)\n"
              "see every earlier position in reach, no later one")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c) for c in (vertical, own_row, whole)]
    fig.legend(handles, ["vertical features (in the horizontal stack: those of row i-1)",
                         "horizontal stack's own convolution along row i", "the whole network"],
               loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("What the gated PixelCNN's stacks see of the map of codes, 5x5 kernel (red: the current position "
                 "(i, j); found by gradients of vqvae.GatedLayer)", fontsize=8.5)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    figures.save(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
