"""Figures every script draws: image grids, training curves, code usage. Matplotlib is imported
when the first figure is drawn, on the Agg backend (files only, no window)."""
from __future__ import annotations

from pathlib import Path

import torch

from lab.files import write_atomically


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str | Path, **savefig_kwargs) -> None:
    """fig as a PNG at `path` (written atomically, like every file of a run), then closed."""
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, **savefig_kwargs))
    pyplot().close(fig)


def save_image_rows(path: str | Path, rows: list[tuple[str, torch.Tensor]], title: str = "",
                    divider: int | None = None) -> None:
    """A grid with one labelled row per (label, images (N, C, H, W) in [0, 1]); with divider d, a
    red line through all rows between columns d - 1 and d (e.g. where real frames end)."""
    plt = pyplot()
    n = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 0.95 + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                image = images[c].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
                ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
        axes[r][0].text(-2, images.shape[-2] / 2, label, ha="right", va="center", fontsize=8)
    if divider is not None:
        left, right = axes[0][divider - 1].get_position(), axes[0][divider].get_position()
        x, bottom = (left.x1 + right.x0) / 2, axes[-1][divider].get_position().y0
        fig.add_artist(plt.Line2D([x, x], [bottom, left.y1], transform=fig.transFigure, color="red", linewidth=1.5))
    fig.suptitle(title, fontsize=9)
    save(fig, path, bbox_inches="tight")


def plot_history(path: str | Path, history: dict[str, list[float]], keys: list[str], title: str = "") -> None:
    """One panel per key of a history {"step": [...], key: [...]}, against step; nothing for a history
    without points (a run stopped before its first log step) or without those keys."""
    keys = [k for k in keys if history and history.get(k)]
    if not keys:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(history["step"], history[key])
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=9)
        if key.endswith("loss") and min(history[key], default=1) > 0:
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


def plot_code_usage(path: str | Path, codes: torch.Tensor, num_embeddings: int, title: str = "") -> None:
    """Bar chart of how often each code occurs in `codes` (any shape), most used first, with the
    number of codes in use."""
    plt = pyplot()
    counts = torch.bincount(codes.long().flatten().cpu(), minlength=num_embeddings).double()
    ordered = counts.sort(descending=True).values
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(ordered)), (ordered / ordered.sum()).numpy(), width=1.0)
    ax.set_xlabel("code (sorted by usage)")
    ax.set_ylabel("fraction of latents")
    ax.set_title(f"{title} {int((counts > 0).sum())}/{len(counts)} codes in use", fontsize=9)
    fig.tight_layout()
    save(fig, path)


def training_curves(out: Path, histories: dict, titles: dict[str, str]) -> None:
    """<out>/<name>_curves.png for each model in histories that has a title: its losses, and the
    perplexity of a VQ-VAE."""
    for name, history in histories.items():
        if history and name in titles:
            keys = [k for k in ("loss", "recon_loss", "commitment_loss", "perplexity") if k in history] \
                or [k for k in history if k != "step"]
            plot_history(out / f"{name}_curves.png", history, keys, titles[name])
