"""Files a run writes and reads: atomic writes, checkpoints of vqvae.py's models ({class, config,
weights}), their fingerprints, and caches keyed by what they were made from."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

import vqvae


def write_atomically(path: str | Path, write) -> None:
    """write(tmp) into a temporary file of this process beside `path`, then rename it to `path`: a
    crash never leaves half a file, and processes that write the same file at once (torchrun's,
    making one data cache) never clash on the temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")  # keeps .npz: np.savez wants it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save, fsynced, through write_atomically, with the SHA-256 of every tensor in it
    ("tensors_sha256"), which load_checkpoint checks: torch.load does not check the archive's CRCs."""
    state = {**state, "tensors_sha256": tensors_digest(state)}

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    write_atomically(path, write)


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True. A truncated, corrupt or foreign file, or one whose tensors
    no longer match the checksum saved with them (flipped bits), is refused with one line that
    names it (SystemExit)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{path}: not a readable checkpoint ({first[:200]}); delete it to train it again, "
                         "or train into another --out") from None
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: not a checkpoint of this project (a {type(state).__name__}); train into another --out")
    saved = state.pop("tensors_sha256", None)
    if saved is not None and saved != tensors_digest(state):
        raise SystemExit(f"{path}: damaged: its tensors do not match the checksum saved with them; delete it to "
                         "train it again, or train into another --out")
    return state


def tensors_digest(obj) -> str:
    """SHA-256 over every tensor of a nested dict/list/tuple, in a fixed order, with its place."""
    digest = hashlib.sha256()

    def walk(x, where):
        if isinstance(x, torch.Tensor):
            digest.update(f"{where} {x.dtype} {tuple(x.shape)}\n".encode())
            digest.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if k != "tensors_sha256":
                    walk(x[k], f"{where}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}/{i}")
    walk(obj, "")
    return digest.hexdigest()


def write_json(path: str | Path, obj) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


# ----------------------------------------------------------------------------- models
MODEL_CLASSES = {model.__name__: (model, config) for model, config in (
    (vqvae.VQVAE, vqvae.VQVAEConfig), (vqvae.AudioVQVAE, vqvae.AudioVQVAEConfig),
    (vqvae.GatedPixelCNN, vqvae.GatedPixelCNNConfig), (vqvae.WaveNet, vqvae.WaveNetConfig),
    (vqvae.ActionConditionalPrior, vqvae.ActionConditionalPriorConfig))}
MODELS = tuple(model for model, _ in MODEL_CLASSES.values())
RENAMED_FIELDS = {"num_classes": "num_categories"}   # WaveNetConfig's fields in runs written before the rename


def model_state(model: torch.nn.Module) -> dict:
    """What restores a model of vqvae.py: {"model_class", "config", "model"} (its weights)."""
    return {"model_class": type(model).__name__, "config": dataclasses.asdict(model.config),
            "model": model.state_dict()}


def load_model(path: str | Path, device="cpu"):
    """(model in eval mode, checkpoint) from a checkpoint of model_state, whatever its class."""
    if not Path(path).exists():
        raise SystemExit(f"{path} not found: run the stage that trains it first")
    state = load_checkpoint(path)
    if state.get("model_class") not in MODEL_CLASSES:
        raise SystemExit(f"{path}: not a checkpoint of a vqvae.py model (an older version may have written it: "
                         "train into another --out)")
    model_class, config_class = MODEL_CLASSES[state["model_class"]]
    fields = {f.name for f in dataclasses.fields(config_class)}
    config = {RENAMED_FIELDS.get(k, k) if k not in fields else k: v for k, v in state["config"].items()}
    model = model_class(config_class(**config)).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), state


def model_fingerprint(state: dict) -> str:
    """"step N, sha256 XXXXXXXXXXXXXXXX" of a checkpoint {"config", "model", "step", ...}: the hash
    covers the config and every weight, so codes and priors made from one VQ-VAE are never taken
    for those of another, even one trained to the same step."""
    digest = hashlib.sha256(json.dumps(state["config"], sort_keys=True).encode())
    for name, tensor in sorted(state["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"step {state['step']}, sha256 {digest.hexdigest()[:16]}"


def content_key(*arrays) -> str:
    """16 hex digits of SHA-256 over arrays' shapes, dtypes and bytes (numpy or torch): a key for
    what is derived from data (codes of the training images, a classifier of the episodes)."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
        digest.update(f"{a.shape} {a.dtype}\n".encode())
        digest.update(a.view(np.uint8).reshape(-1).data if a.size else b"")
    return digest.hexdigest()[:16]


def cached(path: Path, made_from: dict, make, save: bool = True) -> dict:
    """The state saved in `path` if it records exactly `made_from`, else make() (a dict), saved there
    with made_from (when `save`): one rule for every derived file of a run (codes, classifiers)."""
    if path.exists():
        state = load_checkpoint(path)
        if state.get("made_from") == made_from:
            return state
    state = {**make(), "made_from": made_from}
    if save:
        save_checkpoint(path, state)
    return state


# ----------------------------------------------------------------------------- data caches
CACHE_FORMAT = 2  # part of every data-cache key: bump when the decoding of a data set changes


def source_key(source: Path, *settings) -> str:
    """16 hex digits of SHA-256 over what a decoded cache is made from: the decoding settings and
    every byte of the file, or of each file of a folder with its relative path (a file renamed,
    moved between class folders, or rewritten with the same size and time changes the key)."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT} {settings}\n".encode())
    files = sorted(f for f in source.rglob("*") if f.is_file()) if source.is_dir() else [source]
    for f in files:
        digest.update(f"{f.relative_to(source) if source.is_dir() else ''}\0".encode(errors="surrogateescape"))
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def seeded_subset(size: int, n: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random n of `size` examples, or None for all of them (n None or
    not smaller): the subsets of --max-*-images and --max-*-clips, the same for every stage."""
    if n is None or n >= size:
        return None
    return np.sort(np.random.default_rng(seed).permutation(size)[:n])


def check_writable(folder: Path, option: str = "--data-dir") -> None:
    """Refuse, before any decoding, a cache folder that cannot be created or written (the message
    names the option); nothing is created here."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK)):
        raise SystemExit(f"{option} {folder}: cannot be created or written ({existing} is not a writable folder)")


def load_npz(path: Path, keys=()) -> dict | None:
    """The arrays of a data cache, or None when it is missing, or unreadable or lacking one of `keys`
    (then with a message: the caller makes it again)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            arrays = dict(f)
        missing = set(keys) - arrays.keys()
        if not missing:
            return arrays
        problem = f"no {', '.join(sorted(missing))}"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        problem = str(e)
    print(f"{path}: unreadable cache ({problem}); making it again", flush=True)
    return None


def save_npz(path: Path, arrays: dict) -> None:
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays))
