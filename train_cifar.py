"""The paper's CIFAR-10 experiment (Sec. 4.1-4.2), end to end.

Stages, each resumable: (1) vqvae: train the VQ-VAE; (2) prior: fit the class-conditional gated
PixelCNN to the codes of the training images; (3) eval: test-set MSE, NMSE, PSNR, code usage and
bits/dim, and figures. Everything lands in --out: vqvae.pt, codes.pt, prior.pt, metrics.json,
report.md and *.png.

    python train_cifar.py                         # quick preset, the whole pipeline on a CPU
    python train_cifar.py --preset sonnet         # the public Sonnet example's setting
    python train_cifar.py --preset paper          # the paper's setting (a GPU job)
    torchrun --nproc_per_node=2 train_cifar.py    # data-parallel over 2 processes
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vqvae
from lab import cli, figures, guards, images, runs, train

# Each preset sets the defaults of the options below (named after the config fields); any option on
# the command line wins. What each costs and scores: docs/results/cifar10.md.
SHARED = dict(num_embeddings=512, embedding_dim=64, commitment_cost=0.25, num_res_layers=2, prior_lr=3e-4)
PRESETS = {
    # The whole pipeline on a CPU: Sonnet's sizes (full-width outer convolutions), fewer steps, a
    # small prior, and what measured best at that budget (not in the paper): k-means init and
    # dead-code restarts against codebook collapse, a faster EMA (0.9) and a learning-rate cool-down.
    "quick": dict(SHARED, hidden_channels=128, outer_channels=None, res_channels=32, num_groups=1, decay=0.9,
                  kmeans_init=True, dead_code_threshold=0.1, likelihood="gaussian", lr=1e-3, lr_schedule="cooldown",
                  batch_size=32, steps=2000, prior_channels=64, prior_num_layers=6, prior_steps=1000,
                  prior_batch_size=32),
    # DeepMind Sonnet's public vqvae_example, its model exactly (662,723 weights: 64-channel outer
    # convolutions), trained as there: batch 32, lr 3e-4, 10k steps.
    "sonnet": dict(SHARED, hidden_channels=128, outer_channels=64, res_channels=32, num_groups=1, decay=0.99,
                   kmeans_init=False, dead_code_threshold=None, likelihood="gaussian", lr=3e-4,
                   lr_schedule="constant", batch_size=32, steps=10_000, prior_channels=64, prior_num_layers=8,
                   prior_steps=3000, prior_batch_size=32),
    # Sec. 4.1: 256 hidden units, Adam 2e-4, batch 128, 250k steps, 8x8x10 latents with K = 512 and
    # a 256-way categorical decoder for bits/dim. Not in the paper: the dead-code restart, without
    # which a categorical decoder collapsed here.
    "paper": dict(SHARED, hidden_channels=256, outer_channels=None, res_channels=256, num_groups=10, decay=None,
                  kmeans_init=False, dead_code_threshold=0.1, likelihood="categorical", lr=2e-4,
                  lr_schedule="constant", batch_size=128, steps=250_000, prior_channels=256, prior_num_layers=15,
                  prior_steps=100_000, prior_batch_size=128),
}


def parse_args(argv=None):
    p = cli.Parser(__doc__, PRESETS, name="cifar", stages="vqvae,prior,eval", log_every=100, checkpoint_every=1000)
    p.add_argument("--data", type=Path, default=None,
                   help="CIFAR-10 source: the official cifar-10-python.tar.gz, an image folder "
                        "<root>/{train,test}/<class>/*.png|jpg, or a .tar.gz of one (default: "
                        "<data-dir>/cifar-10-python.tar.gz, downloaded and MD5-checked if missing)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="downloads and decoded caches")
    p.add_argument("--image-size", type=cli.checked(int, at_least=4), default=None,
                   help="centre-crop image-folder images to a square and resize them to NxN (N a multiple of 4); "
                        "by default they must share one size with sides multiple of 4")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="3: RGB (grayscale and RGBA images are converted); 1: grayscale")
    p.add_argument("--max-train-images", type=cli.checked(int, at_least=1), help="a seeded random subset, for tests")
    p.add_argument("--max-test-images", type=cli.checked(int, at_least=1), help="a seeded random subset, for tests")
    g = p.add_argument_group("VQ-VAE (defaults from --preset)")
    p.add_encoder_options(g)
    g.add_argument("--outer-channels", type=cli.checked(int, at_least=1),
                   help="channels of the outer strided convolutions (default: --hidden-channels)")
    g.add_argument("--num-groups", type=cli.checked(int, at_least=1), help="codes per latent position (paper: 10)")
    g.add_argument("--likelihood", choices=("gaussian", "categorical"))
    p.add_codebook_options(g)
    p.add_optimizer_options(g)
    p.add_prior_options(p.add_argument_group("prior: a gated PixelCNN (defaults from --preset)"))
    p.may_change_on_resume("data_dir", "max_test_images")
    args = p.parse(argv)
    if args.image_size is not None and args.image_size % 4:
        p.error(f"--image-size: expected a multiple of 4; got {args.image_size}")
    return args


# ============================================================================ the paper's stages
def train_vqvae(args, run, data):
    """Stage 1 (Sec. 3, 4.1): Adam on seeded batches of the training images; the loss is Eq. 3,
    with the reconstruction term scaled by the training pixels' variance (as Sonnet's example)."""
    train_x = data["train_x"]
    config = cli.config(vqvae.VQVAEConfig, args, in_channels=train_x.shape[1], data_variance=data["variance"])
    model = vqvae.VQVAE(config).to(run.device)

    def loss_fn(model, step):
        x = train_x[run.batch(step, len(train_x), args.batch_size, args.seed)].to(run.device).float() / 255 - 0.5
        out = model(x)                                        # x in [-0.5, 0.5], as the paper's code
        metrics = {"loss": out.loss, "recon_loss": out.recon_loss, "commitment_loss": out.commitment_loss,
                   "perplexity": out.perplexity, "codes_used": (out.counts > 0).sum().float()}
        return out.loss, {k: v.detach() for k, v in metrics.items()}

    train.fit(run, "vqvae", model, loss_fn, args.steps, args.lr, args.lr_schedule)


def train_prior(args, run, model, data):
    """Stage 2 (Sec. 3.2, 4.2): the codes of the training images, then a gated PixelCNN fitted to
    them by maximum likelihood, conditioned on the class (an unconditional one without classes)."""
    codes = run.cached("codes", {}, lambda: {"train": images.encode(model, data["train_x"], run.device)})["train"]
    num_classes = len(data["classes"]) or None
    config = cli.config(vqvae.GatedPixelCNNConfig, args, "prior_", kernel_size=5, num_classes=num_classes,
                        num_embeddings=model.config.num_embeddings, num_groups=model.config.num_groups)
    prior = vqvae.GatedPixelCNN(config).to(run.device)
    labels = data["train_y"]

    def loss_fn(prior, step):
        idx = run.batch(step, len(codes), args.prior_batch_size, args.seed + 1)
        target = codes[idx].to(run.device)
        label = labels[idx].to(run.device) if num_classes else None
        loss = F.cross_entropy(prior(target, label), target)                      # nats per code
        return loss, {"prior_loss": loss.detach()}

    train.fit(run, "prior", prior, loss_fn, args.prior_steps, args.prior_lr, made_for=run.vqvae_id)
    return prior.eval()


# ============================================================================ evaluation
@torch.no_grad()
def evaluate(run, model, prior, data) -> tuple[dict, torch.Tensor]:
    """Test-set metrics and codes. Bits/dim uses the bound of Sec. 4.1,
    log p(x) >= log p(x|z_q(x)) + log p(z_q(x)), with the prior and with the uniform log K."""
    test_x, test_y, c = data["test_x"], data["test_y"], model.config
    codes, sq_err, log_px = [], [], []
    for i in range(0, len(test_x), 200):
        x = images.to_float(test_x[i:i + 200], run.device)
        vq = model.quantize(model.encode(x))
        output = model.decoder_output(vq.z_q)
        sq_err.append(((model.to_image(output) - x) ** 2).flatten(1).sum(1).cpu())
        codes.append(vq.codes.cpu())
        if c.likelihood == "categorical":
            log_px.append(model.log_likelihood(x, output).cpu())            # log p(x|z_q), nats
    codes = torch.cat(codes)
    mse = torch.cat(sq_err).sum().item() / test_x[0].numel() / len(test_x)   # pixels in [0, 1]
    metrics = {**images.image_metrics(mse, data["variance"], codes, c.num_embeddings), "num_test_images": len(test_x)}
    num_dims, num_latents = test_x[0].numel(), codes[0].numel()
    if prior is not None:
        labels = test_y.to(run.device) if prior.num_classes else None
        log_pz_y = torch.cat([prior.log_prob(codes[i:i + 500].to(run.device), None if labels is None else
                                             labels[i:i + 500]).cpu() for i in range(0, len(codes), 500)])
        metrics["prior_test_bits_per_code"] = (-log_pz_y.mean() / num_latents / math.log(2)).item()
    if log_px:
        log_px = torch.cat(log_px)
        metrics["test_bits_per_dim_uniform_prior"] = vqvae.bits_per_dim(
            log_px, num_dims, num_latents=num_latents, num_embeddings=c.num_embeddings).mean().item()
        if prior is not None:
            # p(z) = sum_y p(y) p(z|y) >= p(z|y_true) / C for C equally likely classes: a bound on
            # the unconditional log p(x) from one pass of the prior, log2(C) / dims bits/dim looser.
            log_pz = log_pz_y - math.log(prior.num_classes or 1)
            metrics["test_bits_per_dim"] = vqvae.bits_per_dim(log_px, num_dims, log_pz).mean().item()
    return metrics, codes


@torch.no_grad()
def make_figures(args, run, model, prior, data, test_codes) -> None:
    """Reconstructions, code usage, training curves and samples of the prior, decoded."""
    out, test_x = args.out, data["test_x"]
    picks = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(test_x))[:12]).sort().values
    x = images.to_float(test_x[picks], run.device)
    recon = model.decode(model.quantize(model.encode(x)).codes)
    figures.save_image_rows(out / "reconstructions.png", [("original", x.cpu() + 0.5),
                                                          ("reconstruction", recon.cpu() + 0.5)],
                            "test images and their reconstructions")
    figures.plot_code_usage(out / "codebook_usage.png", test_codes, model.config.num_embeddings, "test-set code usage:")
    figures.training_curves(out, run.histories, {"vqvae": "VQ-VAE training", "prior": "prior (nats per code)"})
    if prior is not None:
        classes = data["classes"][:10] if prior.num_classes else ["", ""]   # rows of 8
        labels = torch.arange(len(classes), device=run.device).repeat_interleave(8) if prior.num_classes else None
        gen = torch.Generator(device=run.device).manual_seed(args.seed)
        codes = prior.sample(tuple(test_codes.shape[-2:]), labels, batch_size=8 * len(classes), generator=gen)
        samples = model.decode(codes).cpu() + 0.5
        kind = "class-conditional" if prior.num_classes else "unconditional"
        rows = [(c, samples[i * 8:(i + 1) * 8]) for i, c in enumerate(classes)]
        figures.save_image_rows(out / "prior_samples.png", rows, f"samples: codes from the {kind} prior, decoded")


# ============================================================================ main
def main(argv=None) -> None:
    args = parse_args(argv)
    run = runs.Run.start(args)
    data = images.load_images(args.data, args.data_dir, args.image_size, args.channels, args.max_train_images,
                           args.max_test_images, args.seed)
    run.use_data(data["train_x"], data["train_y"])
    run.print(f"CIFAR-10: {len(data['train_x'])} train / {len(data['test_x'])} test images; preset {args.preset}")
    if "prior" in args.stages:
        if args.prior_batch_size * run.world_size > len(data["train_x"]):
            raise SystemExit(f"--prior-batch-size {args.prior_batch_size} x {run.world_size} process(es): more than "
                             f"the {len(data['train_x'])} training images")
        codes = math.prod(s // 4 for s in data["train_x"].shape[2:]) * args.num_groups   # per image
        guards.check_fits(f"--num-embeddings {args.num_embeddings}: the prior's logits of a batch, with their softmax "
                          "and gradient,", 3 * args.prior_batch_size * codes * args.num_embeddings, run.device,
                          "lower --num-embeddings or --prior-batch-size")

    if "vqvae" in args.stages:
        train_vqvae(args, run, data)
    model = run.load("vqvae")
    if "prior" in args.stages:
        prior = train_prior(args, run, model, data)
    else:
        prior = run.load("prior", optional=True) if "eval" in args.stages else None

    if run.end_training() and "eval" in args.stages:
        metrics, test_codes = evaluate(run, model, prior, data)
        make_figures(args, run, model, prior, data, test_codes)
        run.report(metrics, model.config, num_train_images=len(data["train_x"]), data_variance=data["variance"])


if __name__ == "__main__":
    runs.run_main(main)
