"""TUTORIAL.md's intuition figure: a VQ-VAE with 2-D latents, trained on a toy 2-D dataset, drawn
before and after training in its latent space.

Each panel shows the encoder outputs z_e (dots, coloured by their code), the codebook vectors
(black crosses) with their Voronoi cells (Eq. 1: every point of a cell is quantized to its
vector), and, for a few latents, the three gradients of Eq. 3 as arrows: the reconstruction
gradient copied straight through from z_q to z_e (Eq. 2), the commitment pull of z_e towards its
code, and the codebook pull of each code towards the latents assigned to it (the negative
gradients, each scaled to be visible; their lengths are comparable within a kind only).

    python docs/draw_intuition.py                  # writes docs/intuition.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures  # noqa: E402
import vqvae  # noqa: E402


def toy_data(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) points on a noisy ring: a shape that a few codes must tile."""
    angle = torch.rand(n, generator=generator) * 2 * torch.pi
    radius = 1 + 0.1 * torch.randn(n, generator=generator)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], 1)


class ToyVQVAE(nn.Module):
    """x (N, 2) -> MLP encoder -> z_e (N, 2, 1) -> VectorQuantizer (K codes of D = 2) -> MLP decoder."""

    def __init__(self, num_embeddings: int, beta: float):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))
        self.quantizer = vqvae.VectorQuantizer(num_embeddings, 2, commitment_cost=beta, dead_code_threshold=None)
        self.decoder = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor):
        z_e = self.encoder(x)[:, :, None]                      # (N, D, 1): one latent per point
        vq = self.quantizer(z_e)
        recon_loss = F.mse_loss(self.decoder(vq.z_q[:, :, 0]), x)
        return z_e, vq, recon_loss


def gradients(model: ToyVQVAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """z_e (N, 2), codes (N,), and the negative gradient of each term of Eq. 3: on z_e through
    the straight-through copy (reconstruction), on z_e (commitment), on the codebook (K, 2)."""
    z_e, vq, recon_loss = model(x)
    z_e.retain_grad()
    out = {"z_e": z_e[:, :, 0].detach(), "codes": vq.codes[:, 0]}
    for name, loss, leaf in (("reconstruction", recon_loss, z_e), ("commitment", vq.commitment_loss, z_e),
                             ("codebook", vq.codebook_loss, model.quantizer.codebook)):
        model.zero_grad()
        z_e.grad = None
        loss.backward(retain_graph=True)
        grad = leaf.grad.detach().clone()
        out[name] = -(grad[:, :, 0] if leaf is z_e else grad)
    return out


def draw(ax, model: ToyVQVAE, x: torch.Tensor, title: str) -> None:
    """One panel: Voronoi cells, latents, codes and the gradients of a few latents."""
    g = gradients(model, x)
    codebook = model.quantizer.codebook.detach()
    z = g["z_e"]
    lo, hi = torch.minimum(z.min(0).values, codebook.min(0).values), torch.maximum(z.max(0).values, codebook.max(0).values)
    pad = 0.15 * (hi - lo) + 1e-3
    xs, ys = torch.linspace(lo[0] - pad[0], hi[0] + pad[0], 300), torch.linspace(lo[1] - pad[1], hi[1] + pad[1], 300)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    cells = vqvae.nearest_code(grid, codebook).reshape(300, 300)
    K = len(codebook)
    ax.imshow(cells, origin="lower", extent=(xs[0], xs[-1], ys[0], ys[-1]), cmap="tab10", vmin=0, vmax=9,
              alpha=0.18, interpolation="nearest", aspect="auto")
    ax.scatter(z[:, 0], z[:, 1], c=g["codes"], cmap="tab10", vmin=0, vmax=9, s=6)
    ax.scatter(codebook[:, 0], codebook[:, 1], marker="x", c="black", s=60, linewidths=2, label="codebook e_k")
    shown = torch.arange(0, len(x), len(x) // 12)
    span = float((hi - lo).max())
    for name, colour, points, vectors in (("reconstruction (straight-through)", "tab:blue", z[shown], g["reconstruction"][shown]),
                                          ("commitment pull on z_e", "tab:red", z[shown], g["commitment"][shown]),
                                          ("codebook pull on e_k", "black", codebook, g["codebook"])):
        scale = 0.25 * span / float(vectors.norm(dim=1).max().clamp_min(1e-12))
        ax.quiver(points[:, 0], points[:, 1], vectors[:, 0] * scale, vectors[:, 1] * scale, color=colour,
                  angles="xy", scale_units="xy", scale=1, width=0.006, label=name)
    used = int(g["codes"].unique().numel())
    ax.set_title(f"{title}: {used} of {K} codes used", fontsize=9)
    ax.set_xlabel("z_e, dimension 1")
    ax.set_ylabel("z_e, dimension 2")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "intuition.png")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps on batches of 256 points")
    p.add_argument("--num-embeddings", type=int, default=8, help="K")
    p.add_argument("--commitment-cost", type=float, default=0.25, help="beta")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = ToyVQVAE(args.num_embeddings, args.commitment_cost)
    x = toy_data(400, generator)
    plt = figures.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    draw(axes[0], model, x, "before training")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.steps):
        _, vq, recon_loss = model(toy_data(256, generator))
        loss = recon_loss + vq.codebook_loss + vq.commitment_loss          # Eq. 3
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    draw(axes[1], model, x, f"after {args.steps} steps")
    axes[1].legend(loc="lower right", fontsize=7)
    fig.suptitle("A VQ-VAE with 2-D latents on a ring of points: latent space, Voronoi cells of the codebook "
                 "(Eq. 1) and the gradients of Eq. 3", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
