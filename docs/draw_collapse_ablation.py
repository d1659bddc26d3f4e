"""The codebook-collapse ablation as a bar chart: codes in use and test NMSE for each remedy.

The numbers are measured (docs/results/cifar10.md, "Codebook collapse" has the table and the
commands): the quick preset's VQ-VAE stage, 2,000 steps at the paper's EMA decay 0.99 and a
constant learning rate, full test set, one thread, seeds 0 and 1 (one seed where one is given).

    python docs/draw_collapse_ablation.py          # writes docs/collapse_ablation.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures  # noqa: E402

# (setting, test NMSE per seed, codes used of 512 per seed)
MEASURED = [
    ("codebook loss, no remedy", [0.152, 0.147], [38, 72]),
    ("codebook loss + dead-code restart", [0.182], [512]),
    ("EMA codebook, no remedy", [0.0761, 0.0802], [280, 203]),
    ("EMA + k-means init", [0.0753, 0.0700], [281, 349]),
    ("EMA + dead-code restart", [0.0621, 0.0626], [512, 512]),
    ("EMA + both", [0.0631, 0.0621], [512, 512]),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("collapse_ablation.png"))
    args = parser.parse_args(argv)
    plt = figures.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.5, 2.9), sharey=True)
    rows = list(range(len(MEASURED)))[::-1]
    for y, (name, nmse, used) in zip(rows, MEASURED):
        color = "tab:green" if min(used) == 512 else "tab:red"
        left.barh(y, sum(used) / len(used), color=color, alpha=0.6)
        left.plot(used, [y] * len(used), "k.", markersize=5)
        right.barh(y, sum(nmse) / len(nmse), color=color, alpha=0.6)
        right.plot(nmse, [y] * len(nmse), "k.", markersize=5)
    left.set_yticks(rows, [name for name, _, _ in MEASURED], fontsize=8)
    left.axvline(512, color="gray", linestyle="--", linewidth=1)
    left.set_xlabel("codes in use on the test set, of 512")
    right.set_xlabel("test NMSE (lower is better)")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.suptitle("Codebook collapse: quick preset, 2,000 steps, EMA decay 0.99 (bars: mean; dots: seeds)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
