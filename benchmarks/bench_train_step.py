"""Throughput of one VQ-VAE training step (forward, backward, Adam) in images/s, per preset.

    python benchmarks/bench_train_step.py [--device cpu|cuda] [--threads T] [--steps 20] [--amp off,bf16]

Random 32x32 images; the model of each train_cifar.py preset at that preset's batch size, in each
precision of --amp (autocast, as the training loop does; the quantizer stays in float32).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_cifar  # noqa: E402
from lab import cli, runs  # noqa: E402
import vqvae  # noqa: E402



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per preset, after 3 warm-up steps")
    p.add_argument("--presets", default="quick,sonnet,paper")
    p.add_argument("--amp", default="off", help="comma-separated precisions: off, bf16, fp16")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, {torch.get_num_threads()} threads, quantizer {runs.quantizer_backend(args.device)}")
    print(f"{'preset':>8} {'amp':>5} {'batch':>6} {'params':>8} {'ms/step':>9} {'images/s':>9}")
    for name, amp in [(n, a) for n in args.presets.split(",") for a in args.amp.split(",")]:
        dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        a = train_cifar.parse_args(["--preset", name])
        model = vqvae.VQVAE(cli.config(vqvae.VQVAEConfig, a, data_variance=0.06)).to(args.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=a.lr)
        x = torch.rand(a.batch_size, 3, 32, 32, device=args.device) - 0.5
        times = []
        for i in range(3 + args.steps):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                loss = model(x).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # waits for the step on any device
            times.append(time.perf_counter() - t0)
        ms = 1000 * sorted(times[3:])[len(times[3:]) // 2]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:>8} {amp:>5} {a.batch_size:>6} {params:>7.2f}M {ms:>9.1f} {a.batch_size / ms * 1000:>9.0f}")


if __name__ == "__main__":
    main()
