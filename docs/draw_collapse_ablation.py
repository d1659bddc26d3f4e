"""The codebook-collapse ablation as a bar chart: codes in use and test NMSE for each remedy, read
from the runs behind the table "Codebook collapse: the remedies" of docs/results/cifar10.md (their
metrics.json in docs/results/runs/): the quick preset's VQ-VAE stage, 2,000 steps at a constant
learning rate, with the paper's EMA codebook (decay 0.99) or the codebook loss of Eq. 3, one seed.

    python docs/draw_collapse_ablation.py          # writes docs/collapse_ablation.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures  # noqa: E402

RUNS = Path(__file__).resolve().parent / "results" / "runs"
ROWS = [("codebook loss, no remedy", "ablation_loss_none"), ("codebook loss + dead-code restart", "ablation_loss_restart"),
        ("EMA, no remedy", "ablation_ema_none"), ("EMA + k-means init", "ablation_ema_kmeans"),
        ("EMA + dead-code restart", "ablation_ema_restart"), ("EMA + both", "ablation_ema_both")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("collapse_ablation.png"))
    args = parser.parse_args(argv)
    reports = [json.loads((RUNS / run / "metrics.json").read_text()) for _, run in ROWS]
    plt = figures.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.5, 2.9), sharey=True)
    for y, r in zip(reversed(range(len(ROWS))), reports):
        used, of = r["metrics"]["test_codes_used"], r["model_config"]["num_embeddings"]
        color = plt.get_cmap("RdYlGn")(used / of)          # red: few codes in use, green: all of them
        left.barh(y, used, color=color)
        left.text(used + 5, y, f"{used}", va="center", fontsize=7)
        right.barh(y, r["metrics"]["test_nmse"], color="tab:gray")     # the colour speaks of codes, not of error
        right.text(r["metrics"]["test_nmse"], y, f" {r['metrics']['test_nmse']:.3f}", va="center", fontsize=7)
    left.set_yticks(list(reversed(range(len(ROWS)))), [name for name, _ in ROWS], fontsize=8)
    left.axvline(reports[0]["model_config"]["num_embeddings"], color="gray", linestyle="--", linewidth=1)
    left.set_xlabel("codes in use on the test set, of 512")
    right.set_xlabel("test NMSE (lower is better)")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    right.set_xlim(0, 1.2 * max(r["metrics"]["test_nmse"] for r in reports))
    fig.suptitle("The quick preset's VQ-VAE, 2,000 steps, constant learning rate:\nthe codebook loss or the EMA "
                 "(decay 0.99), with and without remedies (seed 0)", fontsize=8)
    fig.tight_layout()
    figures.save(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
