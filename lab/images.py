"""Images: CIFAR-10 from the official archive (downloaded and MD5-checked) or from image folders,
decoded once into a cache keyed by the source's content; and what the image and frame scripts
measure and draw."""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from lab.files import DataError, load_checkpoint, load_npz, save_npz, seeded_subset
from lab.guards import check_writable, source_key

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SIDE_MULTIPLE = 4  # the image encoder halves each side twice


def load_images(source: Path | None, data_dir: Path, image_size: int | None = None, channels: int = 3,
                max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> dict:
    """Train and test images as uint8 tensors (N, C, H, W), int64 labels, the class names and the
    training pixels' variance, from `source` (the official CIFAR-10 archive, an image folder or a
    .tar.gz of one, see read_image_folder; default: <data_dir>/cifar-10-python.tar.gz, downloaded
    if missing), with seeded random subsets of max_train / max_test images. Raises DataError naming
    the file, or for training images that are all one value (variance 0)."""
    data = load_cifar10(source, data_dir, image_size, channels)
    out = {"classes": [str(c) for c in data["classes"]]}
    for split, n in (("train", max_train), ("test", max_test)):
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        keep = seeded_subset(len(x), n, seed)
        if keep is not None:
            x, y = x[keep], y[keep]
        out[f"{split}_x"], out[f"{split}_y"] = torch.from_numpy(x), torch.from_numpy(y)
    out["variance"] = pixel_variance(out["train_x"])
    if out["variance"] == 0:
        raise DataError(f"{source or data_dir}: every training pixel has the same value (variance 0): the "
                        "reconstruction loss is scaled by 1 / variance; check the images")
    return out


def add_run_options(parser, figure: str) -> None:
    """--run, --out, --data, --data-dir: the options of a figure drawn from a train_cifar.py run (docs/)."""
    parser.add_argument("--run", type=Path, default=Path("runs/cifar_quick"), help="a train_cifar.py --out folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / figure)
    parser.add_argument("--data", type=Path, default=None, help="the test images (default: the run's --data)")
    parser.add_argument("--data-dir", type=Path, default=None, help="decoded caches (default: the run's --data-dir)")


def load_images_of_run(args, max_test: int | None = None) -> dict:
    """load_images for the run in args.run: the --data, --data-dir and image options recorded in its
    vqvae.pt, unless args.data or args.data_dir say otherwise."""
    options = load_checkpoint(args.run / "vqvae.pt").get("options", {})
    data = args.data or (Path(options["data"]) if options.get("data") else None)
    return load_images(data, args.data_dir or Path(options.get("data_dir", "data")), options.get("image_size"),
                       options.get("channels", 3), max_test=max_test or options.get("max_test_images"))


def load_cifar10(source: Path | None, data_dir: Path, image_size: int | None = None, channels: int = 3) -> dict:
    """The arrays of load_images, before subsets, decoded once and cached as .npz in data_dir."""
    check_writable(data_dir)   # before any download or decoding
    if source is None:
        source = data_dir / "cifar-10-python.tar.gz"
        if not source.exists():
            download_official(source)
    if not source.exists():
        raise DataError(f"--data {source}: no such file or folder")
    cache = data_dir / f"{source.name.split('.')[0]}-{source_key(source, image_size, channels)}.npz"
    data = load_npz(cache, keys=("train_x", "train_y", "test_x", "test_y", "classes"))
    if data is not None:
        return data
    is_official = source.is_file() and _is_official_archive(source)
    if is_official and (image_size or channels != 3):
        raise DataError(f"--data {source}: the official CIFAR-10 archive is 32x32 RGB; --image-size and "
                        "--channels apply to image folders")
    data = read_official(source) if is_official else read_image_folder(source, image_size, channels)
    data.setdefault("classes", np.array(CLASSES))
    save_npz(cache, data)
    return data


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


def read_image_folder(path: Path, image_size: int | None = None, channels: int = 3) -> dict:
    """Images of a folder, or of a .tar.gz of one, in one of three layouts:
        <root>/{train,test}/<class>/*.png|jpg   labelled, one class per folder (CIFAR-10's order
                                                when the names match, else alphabetical)
        <root>/{train,test}/*.png|jpg           unlabelled, split given
        <root>/**/*.png|jpg                     unlabelled, every 10th image (by name) held out
    Images are converted to RGB (channels=3) or grayscale (channels=1); 16-bit images are scaled to
    8 bits. With image_size they are centre-cropped to a square and resized to image_size x
    image_size; without it they must all have one size whose sides are multiples of 4. Returns
    uint8 (N, C, H, W) images, int64 labels (zeros without classes) and the class names."""
    items = {"train": [], "test": []}  # (class name or "", relative path, bytes)
    for i, (rel, data) in enumerate(_image_files(path)):
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
    if {bool(c) for split in items.values() for c, _, _ in split} == {True, False}:
        raise DataError(f"{path}: some images are in class folders and some are not; put every image of "
                        "train/ and test/ in a class folder, or none")
    names = sorted({c for split in items.values() for c, _, _ in split if c})
    classes = list(CLASSES) if set(names) == set(CLASSES) else names
    out, size = {"classes": np.array(classes, dtype=str)}, None
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
                found.append((str(f.relative_to(path)).encode(errors="surrogateescape").decode(errors="replace"),
                              f.read_bytes()))
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
    from PIL import Image, ImageOps  # a matplotlib dependency
    try:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))   # upright, as a viewer shows a photo
        if img.mode.startswith("I"):   # 16-bit grayscale (PIL's convert would clip at 255): scale it
            img = Image.fromarray((np.asarray(img, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        img = img.convert("L" if channels == 1 else "RGB")
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


def _is_official_archive(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            return any(Path(m.name).name == "data_batch_1" for m in tar)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read the archive ({e}); is it a complete .tar.gz?") from e


# ----------------------------------------------------------------------------- measures
def to_float(x_uint8: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-0.5, 0.5], the scale of the paper's and Sonnet's code."""
    return x_uint8.to(device).float() / 255 - 0.5


def pixel_variance(x_uint8: torch.Tensor) -> float:
    """The unbiased variance of uint8 pixels on the [0, 1] scale, from exact integer sums: the same
    float however the data were loaded (a float reduction's last bits depend on memory layout and
    threads, and the loss scale 1 / variance then sends two runs of one seed apart)."""
    x = x_uint8.reshape(-1)
    n, s1, s2 = len(x), 0, 0
    for chunk in x.split(1 << 24):
        chunk = chunk.long()
        s1, s2 = s1 + int(chunk.sum()), s2 + int((chunk * chunk).sum())
    return (n * s2 - s1 * s1) / (n * (n - 1) * 255 ** 2)   # Python integers: exact until this division


@torch.no_grad()
def encode(model, inputs: torch.Tensor, device, to_input=to_float, batch_size: int = 200) -> torch.Tensor:
    """Codes of every example of `inputs` (N, ...): (N, *code shape), int64 on the CPU, computed in
    batches by the model's encoder and quantizer (eval mode: the codebook does not move).
    to_input(batch, device) makes the model's input of a batch (default: uint8 images, to_float)."""
    codes = [model.quantize(model.encode(to_input(inputs[i:i + batch_size], device))).codes.cpu()
             for i in range(0, len(inputs), batch_size)]
    return torch.cat(codes)


def image_metrics(mse: float, data_variance: float, codes: torch.Tensor, num_embeddings: int) -> dict:
    """Test-set numbers of an image or frame VQ-VAE: mse (pixels in [0, 1]), NMSE (Sonnet's: mse over
    the training data's variance), PSNR, and the code usage (perplexity of all test codes, codes used)."""
    counts = torch.bincount(codes.long().flatten(), minlength=num_embeddings).double()
    return {"test_mse": mse, "test_nmse": mse / data_variance, "test_psnr_db": 10 * math.log10(1 / mse),
            "test_perplexity": math.exp(torch.special.entr(counts / counts.sum()).sum().item()),
            "test_codes_used": int((counts > 0).sum())}
