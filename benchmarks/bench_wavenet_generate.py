"""Speed of WaveNet generation in samples/s: the incremental Fast WaveNet loop of
`WaveNet.sample` against recomputing the causal forward pass over the whole prefix per sample.

    python benchmarks/bench_wavenet_generate.py [--preset quick] [--threads T] [--samples 2048]
        [--naive-samples 512] [--batches 1,16,96]

The decoder of a train_vctk.py preset (random weights: speed does not depend on them) at 8 kHz
with 6 speakers. The naive loop is timed on --naive-samples samples; its cost per sample grows
with the prefix, so its rate is given for that length only.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_vctk  # noqa: E402
from lab import cli  # noqa: E402
import vqvae  # noqa: E402


@torch.inference_mode()
def naive_generate(model: vqvae.AudioVQVAE, codes: torch.Tensor, speaker: torch.Tensor, samples: int) -> torch.Tensor:
    """Sample by running the full forward pass on the prefix for every new sample (what Fast
    WaveNet avoids): levels (B, samples)."""
    z_q = model.quantizer.lookup(codes)
    hop = model.decoder.hop
    levels = torch.full((len(codes), -(-samples // hop) * hop), 128, dtype=torch.long)
    for t in range(samples):
        end = (t // hop + 1) * hop
        logits = model.decoder(levels[:, :end], z_q[:, :, :end // hop], speaker)[:, :, t]
        levels[:, t] = torch.multinomial(logits.softmax(1), 1)[:, 0]
    return levels[:, :samples]



def rate(fn, samples: int) -> float:
    t0 = time.perf_counter()
    fn()
    return samples / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=train_vctk.PRESETS, default="quick")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--samples", type=int, default=2048, help="samples per clip generated incrementally")
    p.add_argument("--naive-samples", type=int, default=512, help="samples per clip of the naive loop")
    p.add_argument("--batches", default="1,16,96", help="clips generated at once")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    a = train_vctk.parse_args(["--preset", args.preset])
    model = vqvae.AudioVQVAE(cli.config(vqvae.AudioVQVAEConfig, a, num_speakers=6)).eval()
    print(f"preset {args.preset}: WaveNet of {a.wavenet_layers} layers x {a.wavenet_channels} channels, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'incremental samples/s':>22} {'naive samples/s':>16} {'speed-up':>9}")
    for batch in map(int, args.batches.split(",")):
        codes = torch.randint(0, a.num_embeddings, (batch, -(-args.samples // train_vctk.HOP)))
        speaker = torch.arange(batch) % 6
        fast = rate(lambda: model.decode(codes, speaker), batch * codes.shape[1] * train_vctk.HOP)
        slow = rate(lambda: naive_generate(model, codes, speaker, args.naive_samples), batch * args.naive_samples)
        print(f"{batch:>6} {fast:>22.0f} {slow:>16.0f} {fast / slow:>8.1f}x")


if __name__ == "__main__":
    main()
