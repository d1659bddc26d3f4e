"""Speed of sampling codes from the gated PixelCNN prior: `GatedPixelCNN.sample` (the vertical
stack once per row, the horizontal stack on the current row) against the sampler it replaced,
which ran the network over all rows so far for every position. Both draw the same codes for the
same generator; the script checks that too.

    python benchmarks/bench_prior_sample.py [--threads T]

Two settings of the scripts' presets (random weights: speed does not depend on them):
  8x8    train_cifar.py quick: 64 channels, 6 layers, K = 512, 10 classes x 8 samples
  21x21  train_video.py quick: the ActionConditionalPrior's PixelCNN (32 channels, 3 layers,
         K = 512, a 128-channel conditioning map), 48 sequences, one frame
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vqvae  # noqa: E402


@torch.no_grad()
def rows_so_far_sample(model, shape, label=None, batch_size=None, cond=None, generator=None):
    """The previous sampler: for every position, forward() over the rows up to the current one."""
    B = len(label) if label is not None else batch_size
    codes = torch.zeros(B, model.num_groups, *shape, dtype=torch.long)
    for i in range(shape[0]):
        rows, cond_rows = codes[:, :, :i + 1], None if cond is None else cond[:, :, :i + 1]
        for j in range(shape[1]):
            for g in range(model.num_groups):
                logits = model(rows if model.num_groups > 1 else rows[:, 0], label, cond_rows)
                logits = logits if model.num_groups > 1 else logits[:, :, None]
                probs = logits[:, :, g, i, j].float().softmax(1)
                codes[:, g, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return codes if model.num_groups > 1 else codes[:, 0]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {
        "8x8": (vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(512, channels=64, num_layers=6, kernel_size=5, num_classes=10)).eval(),
                (8, 8), dict(label=torch.arange(10).repeat_interleave(8))),
        "21x21": (vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(512, channels=32, num_layers=3, kernel_size=5, cond_channels=128)).eval(),
                  (21, 21), dict(batch_size=48, cond=torch.randn(48, 128, 21, 21))),
    }
    print(f"{args.threads} threads, torch {torch.__version__}")
    print(f"{'map':>6} {'batch':>6} {'rows so far (s)':>16} {'sample (s)':>11} {'speed-up':>9} {'same codes':>11}")
    for name, (model, shape, kwargs) in settings.items():
        old, old_s = timed(lambda: rows_so_far_sample(model, shape, generator=torch.Generator().manual_seed(1), **kwargs))
        new, new_s = timed(lambda: model.sample(shape, generator=torch.Generator().manual_seed(1), **kwargs))
        print(f"{name:>6} {len(new):>6} {old_s:>16.2f} {new_s:>11.2f} {old_s / new_s:>8.1f}x {str(torch.equal(old, new)):>11}")


if __name__ == "__main__":
    main()
