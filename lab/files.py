"""Files a run writes and reads: atomic writes, checksummed checkpoints, checkpoints of vqvae.py's
models ({class, config, weights}), caches keyed by what they were made from; and what the data
readers share: DataError, decoded-data caches (.npz), seeded subsets."""
from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

import vqvae
from lab.guards import check_digest, temporary, tensors_digest


class DataError(SystemExit):
    """A missing, corrupt or unrecognised data source; the message names it and says what to do.
    A SystemExit: uncaught, it ends the program with its message and exit status 1."""


def write_atomically(path: str | Path, write) -> None:
    """write(tmp) into a temporary file of this process beside `path` (guards.temporary), then rename
    it to `path`: a crash never leaves half a file, and processes that write the same file at once
    (torchrun's, making one data cache) never clash on the temporary one. Every file of a run is
    written so; a full disk ends the run with one line that names the file and what was kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise full_disk(path) if e.errno in (errno.ENOSPC, errno.EDQUOT) else e from None
    finally:
        tmp.unlink(missing_ok=True)


def full_disk(path: Path) -> SystemExit:
    """The one line of a write of `path` that found the disk full: what failed, and what was kept."""
    kept = f"the earlier {path.name} is kept" if path.exists() and ".tmp" not in path.name else "it was not written"
    return SystemExit(f"no space left on the device of {path.parent}: writing {path.name} failed and {kept}; free "
                      "some space, then run again (--resume continues from the last checkpoint)")


def write_json(path: str | Path, obj) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save, fsynced, through write_atomically, with the SHA-256 of every tensor in it
    ("tensors_sha256"), which load_checkpoint checks."""
    buffer = io.BytesIO()   # serialized first: a full disk then fails in our write, as an OSError
    torch.save({**state, "tensors_sha256": tensors_digest(state)}, buffer)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    write_atomically(path, write)


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True. A truncated, corrupt or foreign file, or one whose tensors
    no longer match the checksum saved with them (flipped bits), is refused with one line that
    names it (SystemExit)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path):   # an archive of torch.save whose pickle weights_only refused
            raise SystemExit(f"{path}: not a checkpoint of this project: it holds Python objects that are not "
                             "tensors or plain values, which loading would run as code; it was not loaded") from None
        raise SystemExit(f"{path}: not a readable checkpoint (not an archive of torch.save: {e}); delete it to train "
                         "it again, or train into another --out") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{path}: not a readable checkpoint ({first[:200]}); delete it to train it again, "
                         "or train into another --out") from None
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: not a checkpoint of this project (a {type(state).__name__}); train into another --out")
    return check_digest(path, state)


MODEL_CLASSES = {model.__name__: (model, config) for model, config in (
    (vqvae.VQVAE, vqvae.VQVAEConfig), (vqvae.AudioVQVAE, vqvae.AudioVQVAEConfig),
    (vqvae.GatedPixelCNN, vqvae.GatedPixelCNNConfig), (vqvae.WaveNet, vqvae.WaveNetConfig),
    (vqvae.ActionConditionalPrior, vqvae.ActionConditionalPriorConfig))}
MODELS = tuple(model for model, _ in MODEL_CLASSES.values())
# Config fields renamed since: WaveNetConfig.num_classes, ActionConditionalPriorConfig.codebook_dim.
RENAMED_FIELDS = {"num_classes": "num_categories", "codebook_dim": "embedding_dim"}


def model_state(model: torch.nn.Module) -> dict:
    """What restores a model: {"model_class", "config", "model"} (its weights) for one of vqvae.py's,
    {"model"} for another."""
    if not isinstance(model, MODELS):
        return {"model": model.state_dict()}
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


# ----------------------------------------------------------------------------- what the data readers share
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


def seeded_subset(size: int, n: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random n of `size` examples, or None for all of them (n None or
    not smaller): the subsets of --max-*-images and --max-*-clips, the same for every stage."""
    if n is None or n >= size:
        return None
    return np.sort(np.random.default_rng(seed).permutation(size)[:n])
