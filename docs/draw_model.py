"""The VQ-VAE of the CIFAR-10 quick preset with the shape of every tensor: the paper's Fig. 1
made concrete. The shapes are not typed in: the script builds vqvae.VQVAE with the preset's config
and records each layer's output shape with forward hooks.

    python docs/draw_model.py                      # writes docs/model.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures  # noqa: E402
import vqvae  # noqa: E402

QUICK = vqvae.VQVAEConfig(hidden_channels=128, res_channels=32, num_embeddings=512, embedding_dim=64, decay=0.9)


def describe(layer: torch.nn.Module) -> str:
    """A short name of a layer of Encoder/Decoder.net."""
    if isinstance(layer, vqvae.ResidualStack):
        return f"{len(layer.blocks)} residual blocks"
    kind = "conv^T" if isinstance(layer, torch.nn.ConvTranspose2d) else "conv"
    stride = f", stride {layer.stride[0]}" if layer.stride[0] > 1 else ""
    return f"{kind} {layer.kernel_size[0]}x{layer.kernel_size[1]}{stride}"


@torch.no_grad()
def traced_shapes(config: vqvae.VQVAEConfig) -> tuple[list, list, dict]:
    """[(layer name, output shape)] of the encoder (with pre_quantize) and the decoder, and the
    quantizer's outputs, for one 32x32 image."""
    model = vqvae.VQVAE(config).eval()
    encoder, decoder = [], []
    for net, into in ((model.encoder.net, encoder), (model.decoder.net, decoder)):
        for layer in net:
            if not isinstance(layer, torch.nn.ReLU):
                layer.register_forward_hook(lambda m, i, o, into=into: into.append((describe(m), tuple(o.shape))))
    model.pre_quantize.register_forward_hook(lambda m, i, o: encoder.append(("conv 1x1: z_e", tuple(o.shape))))
    out = model(torch.zeros(1, config.in_channels, 32, 32))
    return encoder, decoder, {"codes": tuple(out.codes.shape), "z_q": tuple(out.z_q.shape),
                              "codebook": tuple(model.quantizer.codebook.shape), "x": (1, config.in_channels, 32, 32)}


def shape(s: tuple) -> str:
    return "(B, " + ", ".join(map(str, s[1:])) + ")"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("model.png"))
    args = parser.parse_args(argv)
    encoder, decoder, q = traced_shapes(QUICK)
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.6))
    ax.set_xlim(0, 10.3)
    ax.set_ylim(0, 4.6)
    ax.axis("off")

    def box(x, y, title, sub, color, w=1.25):
        ax.add_patch(plt.Rectangle((x - w / 2, y - 0.32), w, 0.64, facecolor=color, edgecolor="black", linewidth=0.8))
        ax.text(x, y + 0.1, title, ha="center", va="center", fontsize=7.5)
        ax.text(x, y - 0.15, sub, ha="center", va="center", fontsize=7.5, family="monospace")

    def arrow(x0, y0, x1, y1, **kw):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", linewidth=1, **kw))

    top, middle, bottom = 3.9, 2.35, 0.8
    steps = [("image x", shape(q["x"]))] + [(name, shape(s)) for name, s in encoder]
    xs = [0.7 + i * (8.6 / (len(steps) - 1)) for i in range(len(steps))]
    for i, ((name, s), x) in enumerate(zip(steps, xs)):
        box(x, top, name, s, "#dbe9f6" if i else "white")
        if i:
            arrow(xs[i - 1] + 0.63, top, x - 0.63, top)
    ax.text(0.05, top + 0.5, "encoder", fontsize=9, weight="bold")

    box(xs[-1] - 0.2, middle, "nearest code (Eq. 1)", f"codebook e {q['codebook']}", "#fde2c8", w=1.9)
    arrow(xs[-1], top - 0.33, xs[-1] - 0.2, middle + 0.33)
    box(xs[-1] - 2.6, middle, "codes", shape(q["codes"]) + " in [0, 512)", "#fde2c8", w=1.9)
    arrow(xs[-1] - 0.96, middle, xs[-1] - 1.64, middle)
    q_x = xs[-1] - 5.2
    box(q_x, middle, "z_q = e[codes] (Eq. 2)", shape(q["z_q"]), "#fde2c8", w=1.9)
    arrow(xs[-1] - 3.56, middle, xs[-1] - 4.24, middle)
    ax.text(0.05, middle + 0.5, "quantizer", fontsize=9, weight="bold")
    box(8.9, bottom, "prior: gated PixelCNN", "p(codes | class)", "#e4d7f0", w=1.9)
    arrow(xs[-1] - 2.6, middle - 0.33, 8.9, bottom + 0.33, linestyle=":")
    ax.text(8.9, bottom - 0.5, "fitted after the VQ-VAE", ha="center", fontsize=7)

    steps = [(name, shape(s)) for name, s in decoder]
    steps[-1] = (steps[-1][0], "x^ " + steps[-1][1])
    xs = [0.8 + i * (6.2 / (len(steps) - 1)) for i in range(len(steps))]
    for i, ((name, s), x) in enumerate(zip(steps, xs)):
        box(x, bottom, name, s, "#dff0d8", w=1.45)
        if i:
            arrow(xs[i - 1] + 0.73, bottom, x - 0.73, bottom)
    arrow(q_x - 0.5, middle - 0.33, xs[0], bottom + 0.33)
    ax.text(0.05, bottom + 0.5, "decoder", fontsize=9, weight="bold")
    ax.text(0.05, 0.1, "Loss (Eq. 3): reconstruction of x from x^  +  ||sg[z_e] - e||^2 (or the EMA of App. A.1)  +  "
            "beta ||z_e - sg[e]||^2;   the gradient at z_q is copied to z_e (straight through).   "
            "B: batch size.", fontsize=7.5)
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    print(f"wrote {args.out}")
    for name, s in encoder + decoder:
        print(f"{name:28s} {shape(s)}")


if __name__ == "__main__":
    main()
