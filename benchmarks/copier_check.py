"""vqvae.py copied alone into two third-party CIFAR-10 autoencoders, its VectorQuantizer in place of
theirs: the codes in use and the test NMSE after their training, per quantizer setting.

  notebook      the most-copied PyTorch notebook's model (Sonnet's: 4x4/2 convolutions to 64 and
                128 channels, a 3x3 one, two residual blocks of 32; 1x1 to D = 64; the mirror
                decoder), K 512, beta 0.25, Adam 1e-3, batch 32, MSE / variance, 500 steps
  lucidrains    the shape of vector-quantize-pytorch's example autoencoder (3x3 convolutions and
                max-pooling to 32 channels, upsampling back), K 256, D 32, EMA decay 0.8, beta 1,
                AdamW 3e-4, batch 256, L1 + 10 x commitment, 1,000 steps

5,000 training and 1,000 test images (a seeded subset), one thread, without the extension (a copier
has the file alone). --vqvae takes another vqvae.py, e.g. an older one, to compare:

    python benchmarks/copier_check.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz
    git show cf95d48:vqvae.py > /tmp/old_vqvae.py
    python benchmarks/copier_check.py --vqvae /tmp/old_vqvae.py --settings paper --seeds 0 1 2
    python benchmarks/copier_check.py --clients notebook --settings codebook-loss --trace   # every 50 steps
"""
import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lab import images  # noqa: E402

# Quantizer arguments beyond K, D, beta, per setting; the paper's: decay 0.99 (the notebook's client
# keeps its own EMA decay where it sets one).
SETTINGS = {
    "paper": {},                                                        # this vqvae.py's defaults
    "paper-exact": dict(dead_code_threshold=None),                      # no remedy at all
    "kmeans": dict(kmeans_init=True),
    "codebook-loss": dict(decay=None),
    "codebook-loss-exact": dict(decay=None, dead_code_threshold=None),   # Eq. 3 alone, as the paper trains
}


def copied_vqvae(path: Path):
    """vqvae.py alone in an empty folder, imported without vqvae_ext, as a copier has it."""
    folder = Path(tempfile.mkdtemp())
    shutil.copy(path, folder / "vqvae.py")
    sys.modules["vqvae_ext"] = None
    spec = importlib.util.spec_from_file_location("copied_vqvae", folder / "vqvae.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["copied_vqvae"] = module
    spec.loader.exec_module(module)
    return module


class Residual(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, 1, 1, bias=False), nn.ReLU(),
                                   nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x):
        return x + self.block(x)


def notebook(vq, quantizer_args):
    """(encoder, quantizer, decoder, training) of the notebook's shape."""
    encoder = nn.Sequential(nn.Conv2d(3, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
                            nn.Conv2d(128, 128, 3, 1, 1), Residual(128, 32), Residual(128, 32), nn.ReLU(),
                            nn.Conv2d(128, 64, 1))
    quantizer = vq.VectorQuantizer(512, 64, 0.25, **{"decay": 0.99, **quantizer_args})
    decoder = nn.Sequential(nn.Conv2d(64, 128, 3, 1, 1), Residual(128, 32), Residual(128, 32), nn.ReLU(),
                            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(64, 3, 4, 2, 1))
    return encoder, quantizer, decoder, dict(steps=500, batch=32, optimizer=torch.optim.Adam, lr=1e-3,
                                             loss=lambda recon, x, variance: F.mse_loss(recon, x) / variance,
                                             commitment_weight=1.0)


def lucidrains(vq, quantizer_args):
    """(encoder, quantizer, decoder, training) in the shape of vector-quantize-pytorch's example."""
    encoder = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.MaxPool2d(2), nn.GELU(), nn.Conv2d(16, 32, 3, 1, 1),
                            nn.MaxPool2d(2))
    quantizer = vq.VectorQuantizer(256, 32, 1.0, **{"decay": 0.8, **quantizer_args})
    decoder = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(32, 16, 3, 1, 1), nn.GELU(),
                            nn.Upsample(scale_factor=2), nn.Conv2d(16, 3, 3, 1, 1))
    return encoder, quantizer, decoder, dict(steps=1000, batch=256, optimizer=torch.optim.AdamW, lr=3e-4,
                                             loss=lambda recon, x, variance: F.l1_loss(recon, x),
                                             commitment_weight=10.0)


CLIENTS = {"notebook": notebook, "lucidrains": lucidrains}


def run(vq, client: str, setting: str, data: dict, seed: int, trace: bool = False) -> dict:
    torch.manual_seed(seed)
    encoder, quantizer, decoder, how = CLIENTS[client](vq, SETTINGS[setting])
    params = [*encoder.parameters(), *quantizer.parameters(), *decoder.parameters()]
    optimizer = how["optimizer"](params, lr=how["lr"])
    train, test, variance = data["train"], data["test"], data["variance"]
    generator, t0 = torch.Generator().manual_seed(seed), time.perf_counter()
    restarted = 0
    for step in range(1, how["steps"] + 1):
        x = train[torch.randint(len(train), (how["batch"],), generator=generator)]
        use = quantizer.ema_cluster_size.clone() if trace else None
        z_e = encoder(x)
        out = quantizer(z_e)
        quantizer_loss = out.codebook_loss + out.commitment_loss
        recon_loss = how["loss"](decoder(out.z_q), x, variance)
        loss = recon_loss + how["commitment_weight"] * quantizer_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if trace and quantizer.dead_code_threshold is not None:   # the moving use the restart saw (Eq. 6)
            gamma = quantizer.decay or vq.USAGE_DECAY
            restarted += int((use * gamma + (1 - gamma) * out.counts < quantizer.dead_code_threshold).sum())
        if trace and step % 50 == 0:
            print(f"  step {step}: reconstruction loss {recon_loss.item():.3f}, codebook loss "
                  f"{out.codebook_loss.item():.3g} (latents' mean square {z_e.detach().pow(2).mean().item():.3g}), "
                  f"codes in the batch {int((out.counts > 0).sum())}, "
                  f"restarted since step {step - 50} {restarted}", flush=True)
            restarted = 0
    quantizer.eval()
    with torch.no_grad():
        squared, codes = 0.0, []
        for i in range(0, len(test), 250):
            x = test[i:i + 250]
            out = quantizer(encoder(x))
            squared += ((decoder(out.z_q) - x) ** 2).sum().item()
            codes.append(out.codes.flatten())
    return {"client": client, "setting": setting, "seed": seed, "test_nmse": squared / test.numel() / variance,
            "codes_used": int(torch.cat(codes).unique().numel()), "of": quantizer.num_embeddings,
            "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqvae", type=Path, default=ROOT / "vqvae.py", help="the vqvae.py to copy (default: this one)")
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 source, as train_cifar.py --data")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="downloads and decoded caches")
    p.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    p.add_argument("--trace", action="store_true", help="every 50 steps: the losses, the codes in the batch and "
                   "the codes restarted")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    vq = copied_vqvae(args.vqvae)
    loaded = images.load_images(args.data, args.data_dir, max_train=5000, max_test=1000, seed=0)
    data = {"train": images.to_float(loaded["train_x"], "cpu"), "test": images.to_float(loaded["test_x"], "cpu"),
            "variance": loaded["variance"]}
    print(f"vqvae.py: {args.vqvae}; 5000 train / 1000 test images; 1 thread, no extension")
    print("| client | setting | seed | test NMSE | codes used | seconds |\n|---|---|---|---|---|---|")
    rows = []
    for client in args.clients:
        for setting in args.settings:
            for seed in args.seeds:
                rows.append(run(vq, client, setting, data, seed, args.trace))
                r = rows[-1]
                print(f"| {client} | {setting} | {seed} | {r['test_nmse']:.4f} | {r['codes_used']} of {r['of']} | "
                      f"{r['seconds']:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"vqvae": str(args.vqvae), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
