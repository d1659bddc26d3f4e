"""The video experiment's six runs, one dot per run, against the goals: how often the action
classifier names the commanded action (real held-out transitions, generated ones at guidance
w = 0.25 and 0.5, and generated with shuffled actions), and the pixel MSE of the mean of four
draws against copying the last real frame.

The numbers are measured (docs/results/video.md, "Six runs", has the table and the commands):
the quick preset, seeds 0, 1, 2 trained with two threads and again with one.

    python docs/draw_video_runs.py                 # writes docs/video_runs.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures  # noqa: E402

# per run: two threads seeds 0 / 1 / 2, one thread seeds 0 / 1 / 2
NAMED = {  # % of transitions the action classifier names as the action given, and the goal
    "real held-out\ntransitions": ([92.1, 91.1, 91.3, 91.5, 90.9, 90.8], 90),
    "generated,\nw = 0.25": ([76.2, 74.2, 75.8, 80.8, 78.6, 71.6], 80),
    "generated,\nw = 0.5 (default)": ([81.5, 77.9, 78.6, 84.8, 82.1, 76.6], 80),
    "generated, shuffled\nactions, w = 0.5": ([81.9, 78.8, 78.4, 83.2, 81.3, 75.7], None),
}
MSE = {  # pixel MSE at w = 0.5
    "mean of 4 draws,\ntrue actions": [0.0098, 0.0157, 0.0155, 0.0106, 0.0149, 0.0154],
    "mean of 4 draws,\nshuffled actions": [0.0129, 0.0184, 0.0184, 0.0143, 0.0181, 0.0177],
    "copying the\nlast real frame": [0.0146, 0.0201, 0.0219, 0.0146, 0.0201, 0.0219],
}
MARKERS = ["o", "s", "^", "o", "s", "^"]  # seeds 0 / 1 / 2; filled: two threads, open: one


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("video_runs.png"))
    args = parser.parse_args(argv)
    plt = figures.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [4, 3]})
    for x, (name, (values, goal)) in enumerate(NAMED.items()):
        for run, (v, m) in enumerate(zip(values, MARKERS)):
            left.scatter(x + (run - 2.5) * 0.07, v, marker=m, s=22, color="tab:blue",
                         facecolors="tab:blue" if run < 3 else "none")
        if goal is not None:
            left.hlines(goal, x - 0.35, x + 0.35, color="tab:red", linewidth=1.5)
            left.text(x + 0.36, goal, f"goal {goal}%", color="tab:red", fontsize=7, va="center")
    left.set_xticks(range(len(NAMED)), list(NAMED), fontsize=7)
    left.set_ylabel("named as the action given (%)")
    left.set_xlim(-0.5, len(NAMED) - 0.3)
    left.grid(axis="y", alpha=0.3)
    for run in range(6):
        right.plot(range(len(MSE)), [v[run] for v in MSE.values()], color="gray", linewidth=0.6)
        right.scatter(range(len(MSE)), [v[run] for v in MSE.values()], marker=MARKERS[run], s=22, color="tab:blue",
                      facecolors="tab:blue" if run < 3 else "none")
    right.set_xticks(range(len(MSE)), list(MSE), fontsize=7)
    right.set_ylabel("pixel MSE over 10 generated frames")
    right.grid(axis="y", alpha=0.3)
    fig.suptitle("Video, six runs (seeds 0 / 1 / 2 by marker; filled: two threads, open: one)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
