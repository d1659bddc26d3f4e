"""The paper's CIFAR-10 experiment (Sec. 4.1-4.2), end to end.

Stages, each resumable: (1) train the VQ-VAE, (2) extract the codes of the training set and fit
the class-conditional gated PixelCNN prior on them, (3) evaluate on the test set (MSE, NMSE,
PSNR, perplexity, codes in use, bits/dim) and (4) draw figures. Everything lands in --out:
vqvae.pt, prior.pt, codes.pt, metrics.json and *.png.

    python train_cifar.py                         # quick preset, the whole pipeline on a CPU
    python train_cifar.py --preset sonnet         # the public Sonnet example's setting
    python train_cifar.py --preset paper          # the paper's setting (a GPU job)
    torchrun --nproc_per_node=2 train_cifar.py    # data-parallel over 2 processes
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import pickle
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import training
import vqvae

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Each preset sets the defaults of the options below (named after the config fields); any option on
# the command line wins. What each costs and scores is measured in README.md and TUTORIAL.md.
PRESETS = {
    # The whole pipeline on a CPU: Sonnet's sizes (but full-width outer convolutions), fewer steps,
    # a small prior, and what measured best at that budget (not in the paper): the two remedies
    # for codebook collapse, a faster EMA (decay 0.9, not 0.99) and a linear learning-rate
    # cool-down over the last 20% of the steps.
    "quick": dict(hidden_channels=128, outer_channels=None, res_channels=32, num_res_layers=2, embedding_dim=64,
                  num_embeddings=512, num_groups=1, decay=0.9, commitment_cost=0.25, kmeans_init=True,
                  dead_code_threshold=0.1, likelihood="gaussian", lr=1e-3, lr_schedule="cooldown", batch_size=32, steps=2000,
                  prior_channels=64, prior_num_layers=6, prior_steps=1000, prior_batch_size=32, prior_lr=3e-4),
    # DeepMind Sonnet's public vqvae_example, its model exactly (662,723 weights: 64-channel outer
    # convolutions), trained as there: batch 32, lr 3e-4, 10k steps.
    "sonnet": dict(hidden_channels=128, outer_channels=64, res_channels=32, num_res_layers=2, embedding_dim=64,
                   num_embeddings=512, num_groups=1, decay=0.99, commitment_cost=0.25, kmeans_init=False,
                   dead_code_threshold=None, likelihood="gaussian", lr=3e-4, lr_schedule="constant", batch_size=32, steps=10_000,
                   prior_channels=64, prior_num_layers=8, prior_steps=3000, prior_batch_size=32, prior_lr=3e-4),
    # Paper, Sec. 4.1: 256 hidden units, Adam 2e-4, batch 128, 250k steps, 8x8x10 latents with
    # K = 512 and a 256-way categorical decoder for bits/dim. Not in the paper: the dead-code
    # restart, without which a categorical decoder here collapsed (TUTORIAL, section 11).
    "paper": dict(hidden_channels=256, outer_channels=None, res_channels=256, num_res_layers=2, embedding_dim=64,
                  num_embeddings=512, num_groups=10, decay=None, commitment_cost=0.25, kmeans_init=False,
                  dead_code_threshold=0.1, likelihood="categorical", lr=2e-4, lr_schedule="constant", batch_size=128, steps=250_000,
                  prior_channels=256, prior_num_layers=15, prior_steps=100_000, prior_batch_size=128, prior_lr=3e-4),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="quick",
                   help="quick (default): the whole pipeline on a CPU; sonnet: the public Sonnet example's model "
                        "and training; paper: the paper's setting, 250k steps at batch 128 (a GPU job)")
    p.add_argument("--data", type=Path, default=None,
                   help="CIFAR-10 source: the official cifar-10-python.tar.gz, an image folder "
                        "<root>/{train,test}/<class>/*.png|jpg, or a .tar.gz of one (default: "
                        "<data-dir>/cifar-10-python.tar.gz, downloaded and MD5-checked if missing)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="downloads and decoded caches")
    p.add_argument("--image-size", type=int, default=None,
                   help="centre-crop image-folder images to a square and resize them to NxN (N a multiple of 4); "
                        "by default they must share one size with sides multiple of 4")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="3: RGB (grayscale and RGBA images are converted); 1: grayscale")
    training.add_run_arguments(p, "vqvae,prior,eval", log_every=100, checkpoint_every=1000)
    p.add_argument("--max-train-images", type=int, default=None, help="a seeded random subset, for tests")
    p.add_argument("--max-test-images", type=int, default=None, help="a seeded random subset, for tests")
    g = p.add_argument_group("VQ-VAE (defaults from --preset)")
    training.add_encoder_arguments(g)
    g.add_argument("--outer-channels", type=int, help="channels of the outer strided convolutions (default: "
                                                      "--hidden-channels)")
    g.add_argument("--num-groups", type=int, help="codes per latent position (paper bits/dim: 10)")
    g.add_argument("--likelihood", choices=("gaussian", "categorical"))
    training.add_codebook_arguments(g)
    training.add_optimizer_arguments(g)
    training.add_prior_arguments(p.add_argument_group("prior: a gated PixelCNN (defaults from --preset)"))
    args = training.parse_with_presets(p, PRESETS, argv, "cifar")
    if args.image_size is not None and (args.image_size < SIDE_MULTIPLE or args.image_size % SIDE_MULTIPLE):
        p.error(f"--image-size: expected a multiple of {SIDE_MULTIPLE}; got {args.image_size}")
    return args


# ============================================================================ data
class DataError(Exception):
    """A missing, corrupt or unrecognised data source; the message says what to do."""


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_official(dest: Path) -> None:
    """Fetch the official archive to dest, checking its MD5 before it takes the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # one per process: torchrun may download twice
    print(f"downloading {CIFAR10_URL} -> {dest}", flush=True)
    try:
        urllib.request.urlretrieve(CIFAR10_URL, tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {CIFAR10_URL}: {e}. Download it by hand to {dest}, "
                        "or pass --data with a local copy") from e
    if _md5(tmp) != CIFAR10_MD5:
        tmp.unlink()
        raise DataError(f"the download of {CIFAR10_URL} failed its MD5 check; nothing was kept")
    os.replace(tmp, dest)


def read_official(path: Path) -> dict:
    """The official python archive: MD5 first (unpickling runs code), then the pickled batches."""
    if _md5(path) != CIFAR10_MD5:
        raise DataError(f"{path}: MD5 differs from the official {CIFAR10_MD5}; refusing to unpickle it")
    parts = {"train": [], "test": []}
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            split = "train" if name.startswith("data_batch_") else "test" if name == "test_batch" else None
            if split:
                batch = pickle.load(tar.extractfile(member), encoding="bytes")
                parts[split].append((np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32),
                                     np.asarray(batch[b"labels"], np.int64)))
    if len(parts["train"]) != 5 or len(parts["test"]) != 1:
        raise DataError(f"{path}: not the CIFAR-10 python archive (expected data_batch_1..5 and test_batch)")
    return {f"{split}_{k}": np.concatenate([p[i] for p in parts[split]])
            for split in parts for i, k in enumerate(("x", "y"))}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SIDE_MULTIPLE = 4  # the image encoder halves each side twice


def read_image_folder(path: Path, image_size: int | None = None, channels: int = 3) -> dict:
    """Images of a folder, or of a .tar.gz of one, in one of three layouts:
        <root>/{train,test}/<class>/*.png|jpg   labelled, one class per folder (CIFAR-10's order
                                                when the names match, else alphabetical)
        <root>/{train,test}/*.png|jpg           unlabelled, split given
        <root>/**/*.png|jpg                     unlabelled, every 10th image (by name) held out
    Images are converted to RGB (channels=3) or grayscale (channels=1). With image_size they are
    centre-cropped to a square and resized to image_size x image_size; without it they must all
    have one size whose sides are multiples of 4. Returns uint8 (N, C, H, W) images, int64 labels
    (zeros without classes) and the class names (empty without classes)."""
    found = _image_files(path)
    items = {"train": [], "test": []}  # (class name or "", relative path, bytes)
    for i, (rel, data) in enumerate(found):
        parts = Path(rel).parts
        split = next((k for k in range(len(parts) - 1) if parts[k] in items), None)
        if split is None:                                      # no train/ or test/ in the path
            items["test" if i % 10 == 9 else "train"].append(("", rel, data))
        else:
            label = parts[split + 1] if split + 2 < len(parts) else ""
            items[parts[split]].append((label, rel, data))
    if not items["train"] or not items["test"]:
        raise DataError(f"{path}: found {len(items['train'])} training and {len(items['test'])} test images; expected "
                        "train/<class>/ and test/<class>/ folders (or train/ and test/ without classes, or a flat "
                        "folder of 10 or more images)")
    labelled = {bool(c) for split in items.values() for c, _, _ in split}
    if labelled == {True, False}:
        raise DataError(f"{path}: some images are in class folders and some are not; put every image of "
                        "train/ and test/ in a class folder, or none")
    names = sorted({c for split in items.values() for c, _, _ in split if c})
    classes = list(CLASSES) if set(names) == set(CLASSES) else names
    out = {"classes": np.array(classes, dtype=str)}
    size = None
    for split, chosen in items.items():
        chosen.sort(key=lambda t: (classes.index(t[0]) if t[0] else 0, t[1]))
        images = [_decode_image(path, rel, data, channels, image_size) for _, rel, data in chosen]
        size = size or images[0].shape
        for (_, rel, _), image in zip(chosen, images):
            if image.shape != size:
                raise DataError(f"{path}: {rel} is {image.shape[2]}x{image.shape[1]} but the first image is "
                                f"{size[2]}x{size[1]}; pass --image-size N to crop and resize all to NxN")
        out[f"{split}_x"] = np.stack(images)
        out[f"{split}_y"] = np.array([classes.index(c) if c else 0 for c, _, _ in chosen], np.int64)
    return out


def _image_files(path: Path) -> list[tuple[str, bytes]]:
    """(relative path, bytes) of every image file in a folder or a .tar.gz, sorted by path."""
    found = []
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                found.append((str(f.relative_to(path)), f.read_bytes()))
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                for m in tar:
                    if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES:
                        found.append((m.name, tar.extractfile(m).read()))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read the archive ({e}); is it a complete .tar.gz?") from e
    if not found:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return sorted(found)


def _decode_image(path: Path, rel: str, data: bytes, channels: int, image_size: int | None) -> np.ndarray:
    """One image file's bytes -> uint8 (C, H, W): converted, centre-cropped and resized with image_size."""
    from PIL import Image  # a matplotlib dependency
    try:
        img = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path}: {rel} is not a readable image ({e})") from e
    if image_size:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)
    if img.width % SIDE_MULTIPLE or img.height % SIDE_MULTIPLE:
        raise DataError(f"{path}: {rel} is {img.width}x{img.height}; sides must be multiples of "
                        f"{SIDE_MULTIPLE} (the encoder halves them twice): pass --image-size N")
    # Contiguous (C, H, W): a transposed view would make the stacked images channels-last in memory,
    # unlike those loaded from the cache, and convolutions round differently on the two layouts.
    return np.ascontiguousarray(np.asarray(img).reshape(img.height, img.width, channels).transpose(2, 0, 1))


def load_cifar10(source: Path | None, data_dir: Path, image_size: int | None = None, channels: int = 3) -> dict:
    """Train and test uint8 images (N, C, H, W), int64 labels and class names, from `source` (see
    --data and read_image_folder), decoded once and cached as .npz in data_dir, keyed by training.source_key."""
    if source is None:
        source = data_dir / "cifar-10-python.tar.gz"
        if not source.exists():
            download_official(source)
    if not source.exists():
        raise DataError(f"--data {source}: no such file or folder")
    cache = data_dir / f"{source.name.split('.')[0]}-{training.source_key(source, image_size, channels)}.npz"
    data = training.load_npz(cache, keys=("train_x", "train_y", "test_x", "test_y", "classes"))
    if data is not None:
        return data
    is_official = source.is_file() and _is_official_archive(source)
    if is_official and (image_size or channels != 3):
        raise DataError(f"--data {source}: the official CIFAR-10 archive is 32x32 RGB; --image-size and "
                        "--channels apply to image folders")
    data = read_official(source) if is_official else read_image_folder(source, image_size, channels)
    data.setdefault("classes", np.array(CLASSES))
    training.save_npz(cache, data)
    return data


def _is_official_archive(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            return any(Path(m.name).name == "data_batch_1" for m in tar)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read the archive ({e}); is it a complete .tar.gz?") from e


def subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int):
    if n is None or n >= len(x):
        return x, y
    keep = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    return x[keep], y[keep]


def to_float(x_uint8: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-0.5, 0.5], the scale of the paper's and Sonnet's code."""
    return x_uint8.to(device).float() / 255 - 0.5


# ============================================================================ stages
@torch.no_grad()
def encode_all(model, x_uint8: torch.Tensor, device, decode: bool = False, batch_size: int = 200):
    """Codes of a whole split, (N, [G,] 8, 8); with decode, also per image the squared error
    sum and, for the categorical decoder, log p(x|z_q) in nats."""
    codes, sq_err, log_px = [], [], []
    for i in range(0, len(x_uint8), batch_size):
        x = to_float(x_uint8[i:i + batch_size], device)
        vq = model.quantize(model.encode(x))
        codes.append(vq.indices.cpu())
        if decode:
            decoded = model.decode_latents(vq.z_q)
            sq_err.append(((model.reconstruction(decoded) - x) ** 2).flatten(1).sum(1).cpu())
            if model.config.likelihood == "categorical":
                log_px.append(model.log_likelihood(x, decoded).cpu())
    return torch.cat(codes), torch.cat(sq_err) if sq_err else None, torch.cat(log_px) if log_px else None


def train_prior(args, run: training.Run, env, model, vqvae_id, train_x, train_y, num_classes: int):
    """The gated PixelCNN over the training set's codes: class-conditional when num_classes > 0."""
    codes_path = run.out / "codes.pt"
    cached = training.load_checkpoint(codes_path) if codes_path.exists() else None
    if cached is not None and cached.get("vqvae_id") == vqvae_id:
        codes = cached["train"]
    else:  # absent, or the codes of another VQ-VAE
        codes = encode_all(model, train_x, env.device)[0]
        if env.is_main:
            training.save_checkpoint(codes_path, {"train": codes, "vqvae_id": vqvae_id})
    if (run.out / "prior.pt").exists():
        training.check_prior_matches(training.load_checkpoint(run.out / "prior.pt"), vqvae_id)
    config = training.config_from_args(vqvae.GatedPixelCNNConfig, args, "prior_", kernel_size=5,
                                       num_embeddings=model.config.num_embeddings, num_groups=model.config.num_groups,
                                       num_classes=num_classes or None)
    prior = vqvae.GatedPixelCNN(config).to(env.device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=args.prior_lr)

    def loss_fn(ddp, step):
        idx = training.batch_indices(step, len(codes), args.prior_batch_size, args.seed + 1, env)
        logits = ddp(codes[idx].to(env.device), train_y[idx].to(env.device) if num_classes else None)
        loss = F.cross_entropy(logits, codes[idx].to(env.device))  # nats per latent
        return loss, {"prior_loss": loss.detach()}

    history = training.run_loop("prior", prior, optimizer, loss_fn, args.prior_steps, run, env, {"vqvae_id": vqvae_id})
    return prior, history


@torch.no_grad()
def evaluate(env, model, prior, data, data_variance):
    """Test-set metrics; bits/dim uses the paper's bound with the prior and with the uniform log K."""
    test_x, test_y = data["test_x"], data["test_y"]
    codes, sq_err, log_px = encode_all(model, test_x, env.device, decode=True)
    c = model.config
    mse = sq_err.sum().item() / test_x[0].numel() / len(test_x)   # on the [0, 1] pixel scale
    metrics = {**training.image_metrics(mse, data_variance, codes, c.num_embeddings), "num_test_images": len(test_x)}
    num_dims, num_latents = test_x[0].numel(), codes[0].numel()
    if prior is not None:
        prior.eval()
        labels = test_y.long().to(env.device) if prior.num_classes else None
        log_pz_y = torch.cat([prior.log_prob(codes[i:i + 500].to(env.device), None if labels is None else
                                             labels[i:i + 500]).cpu()
                              for i in range(0, len(codes), 500)])           # log p(z|y) (or p(z)), nats
        metrics["prior_test_bits_per_latent"] = (-log_pz_y.mean() / num_latents / math.log(2)).item()
    if log_px is not None:
        metrics["test_bits_per_dim_uniform_prior"] = vqvae.bits_per_dim(
            log_px, num_dims, num_latents=num_latents, num_embeddings=c.num_embeddings).mean().item()
        if prior is not None:
            # p(z) = sum_y p(y) p(z|y) >= p(z|y_true) / C for C equally likely classes: a bound on
            # the unconditional log p(x) from one pass of the prior, log2(C) / dims bits/dim looser.
            log_pz = log_pz_y - math.log(prior.num_classes or 1)
            metrics["test_bits_per_dim"] = vqvae.bits_per_dim(log_px, num_dims, log_pz).mean().item()
    return metrics, codes


@torch.no_grad()
def make_figures(out: Path, seed: int, env, model, prior, data, test_codes, histories):
    test_x = data["test_x"]
    picks = torch.from_numpy(np.random.default_rng(seed).permutation(len(test_x))[:12]).sort().values
    x = to_float(test_x[picks], env.device)
    recon = model.reconstruction(model.decode_latents(model.quantize(model.encode(x)).z_q))
    training.save_image_rows(out / "reconstructions.png", [("original", x.cpu() + 0.5), ("reconstruction", recon.cpu() + 0.5)],
                             "test images and their reconstructions")
    counts = torch.bincount(test_codes.flatten(), minlength=model.config.num_embeddings)
    training.plot_code_usage(out / "codebook_usage.png", counts, "test-set code usage:")
    if histories.get("vqvae"):
        training.plot_history(out / "vqvae_curves.png", histories["vqvae"],
                              ["loss", "recon_loss", "commitment_loss", "perplexity"], "VQ-VAE training")
    if histories.get("prior"):
        training.plot_history(out / "prior_curves.png", histories["prior"], ["prior_loss"], "prior (nats per latent)")
    if prior is not None:
        classes = [str(c) for c in data["classes"]][:10] if prior.num_classes else ["", ""]  # rows of 8
        labels = torch.arange(len(classes), device=env.device).repeat_interleave(8) if prior.num_classes else None
        shape = tuple(test_codes.shape[-2:])
        gen = torch.Generator(device=env.device).manual_seed(seed)
        codes = prior.sample(shape, labels, batch_size=8 * len(classes), generator=gen)
        samples = model.reconstruction(model.decode(codes)).cpu() + 0.5
        kind = "class-conditional" if prior.num_classes else "unconditional"
        training.save_image_rows(out / "prior_samples.png", [(c, samples[i * 8:(i + 1) * 8]) for i, c in enumerate(classes)],
                                 f"samples: codes from the {kind} prior, decoded")


def load_data(args) -> dict:
    """The chosen subsets of the train and test splits, as tensors, and the class names."""
    try:
        data = load_cifar10(args.data, args.data_dir, args.image_size, args.channels)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    data["train_x"], data["train_y"] = subset(data["train_x"], data["train_y"], args.max_train_images, args.seed)
    data["test_x"], data["test_y"] = subset(data["test_x"], data["test_y"], args.max_test_images, args.seed)
    return {k: torch.from_numpy(v) if k != "classes" else v for k, v in data.items()}


def train_model(args, run: training.Run, env, train_x: torch.Tensor, data_variance: float):
    """The VQ-VAE stage: Adam on seeded batches of the training images."""
    def batch(step):
        return to_float(train_x[training.batch_indices(step, len(train_x), args.batch_size, args.seed, env)], env.device)

    config = training.config_from_args(vqvae.VQVAEConfig, args, in_channels=train_x.shape[1],
                                       data_variance=data_variance)
    return training.train_vqvae(config, batch, args.lr, args.steps, run, env, args.lr_schedule)


def main(argv=None) -> None:
    args = parse_args(argv)
    run, env = training.start(args)
    data = load_data(args)
    data_variance = training.pixel_variance(data["train_x"])
    if env.is_main:
        print(f"CIFAR-10: {len(data['train_x'])} train / {len(data['test_x'])} test images; preset {args.preset}; "
              f"device {env.device} x {env.world_size}; quantizer {vqvae.quantizer_backend(env.device)}; "
              f"out {args.out}", flush=True)
    t0, histories, timings = time.perf_counter(), {}, {}

    if "vqvae" in args.stages:
        model, histories["vqvae"] = train_model(args, run, env, data["train_x"], data_variance)
        if histories["vqvae"] is None:
            training.stopped()
        timings["vqvae_seconds"] = time.perf_counter() - t0
    model, state = training.load_model(args.out / "vqvae.pt", env.device)
    histories["vqvae"], vqvae_id = state["history"], training.model_fingerprint(state)

    prior = None
    if "prior" in args.stages:
        t1 = time.perf_counter()
        prior, histories["prior"] = train_prior(args, run, env, model, vqvae_id, data["train_x"], data["train_y"],
                                                len(data["classes"]))
        if histories["prior"] is None:
            training.stopped()
        timings["prior_seconds"] = time.perf_counter() - t1
    elif "eval" in args.stages and (args.out / "prior.pt").exists():
        prior, histories["prior"] = training.load_prior(args.out / "prior.pt", vqvae_id, env.device)

    training.teardown()  # the main process evaluates alone
    if "eval" in args.stages and env.is_main:
        t2 = time.perf_counter()
        metrics, test_codes = evaluate(env, model, prior, data, data_variance)
        make_figures(args.out, args.seed, env, model, prior, data, test_codes, histories)
        timings["eval_seconds"] = time.perf_counter() - t2
        training.write_report(run, metrics, model.config, time.perf_counter() - t0, timings, env,
                              num_train_images=len(data["train_x"]), data_variance=data_variance)


if __name__ == "__main__":
    training.run_main(main)
