"""The guards of a run, in one place: what keeps a user's results safe. Each refuses in one line
(SystemExit) naming the file or option, what was expected and what was found.

  the lock          one run per --out folder (lock_out)
  checksums         every checkpoint carries the SHA-256 of its tensors (tensors_digest)
  content keys      caches and models are keyed by the bytes they were made from (content_key, source_key)
  resume            a checkpoint is continued only with the options, data and processes it was
                    trained with, or a lowered learning rate (check_resume); a prior only for the
                    VQ-VAE whose codes it was fitted to (check_made_for)
  folders           a data folder is checked writable before any decoding (check_writable)
  divergence        a non-finite loss, gradient or weight stops the run, naming the last good
                    checkpoint (diverged)

The training loop (lab/train.py) and the files it writes (lab/files.py) call them by name. This
module imports nothing else of the project.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch


# ----------------------------------------------------------------------------- the lock
def temporary(path: Path) -> Path:
    """The temporary file beside `path` that this process writes before renaming it to `path`:
    <stem>.<pid>.tmp<suffix> (the suffix kept: np.savez and savefig read it)."""
    return path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")


_TEMPORARY = re.compile(r".+\.(\d+)\.tmp(\.\w+)?")   # temporary()'s names, the process id in group 1


def lock_out(out: Path) -> None:
    """Create --out and its lock file `.lock` (holding this process id), removed at exit. A folder
    that cannot be written is refused, and so is a second run on it while the first lives; a lock
    left by a dead process is taken over with a message, and so are the temporary files that dead
    processes left (a kill during a checkpoint write): only names of temporary()'s pattern whose
    process no longer runs, never another file. Under torchrun, process 0 speaks for the run."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        _lock(out / ".lock")
    except OSError as e:
        raise SystemExit(f"--out {out}: not a writable folder ({e.strerror or e})") from e
    for tmp in sorted(out.iterdir()):
        match = _TEMPORARY.fullmatch(tmp.name)
        if match and tmp.is_file() and not _alive(int(match.group(1))):
            print(f"{tmp}: left by an interrupted write of process {match.group(1)}; deleted", flush=True)
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass    # alive, under another user
    return True


def _lock(lock: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (ValueError, FileNotFoundError):
                pid = 0
            if pid == os.getpid():
                return  # this process holds it already (main() called again, as tests do)
            if not pid or not _alive(pid):
                print(f"{lock}: left by a process that no longer runs; taking it over", flush=True)
                lock.unlink(missing_ok=True)
                continue
            raise SystemExit(f"--out {lock.parent}: another run (process {pid}) is using this folder; wait for it to "
                             f"end or choose another --out (delete {lock} if that process is not a run)")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        pid = os.getpid()
        atexit.register(lambda: lock.unlink(missing_ok=True) if os.getpid() == pid else None)
        return


# ----------------------------------------------------------------------------- checksums and content keys
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


def check_digest(path: Path, state: dict) -> dict:
    """The state of a loaded checkpoint without its "tensors_sha256", refused if its tensors no
    longer match it (flipped bits: torch.load does not check the archive's CRCs)."""
    saved = state.pop("tensors_sha256", None)
    if saved is not None and saved != tensors_digest(state):
        raise SystemExit(f"{path}: damaged: its tensors do not match the checksum saved with them; delete it to "
                         "train it again, or train into another --out")
    return state


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


CACHE_FORMAT = 3  # part of every data-cache key: bump when the decoding of a data set changes (3: EXIF)


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


# ----------------------------------------------------------------------------- resume
# Learning rates a resumed run may lower (recorded in the checkpoint's "resumed" list): how a
# diverged run goes on from its last good checkpoint.
LOWERABLE = ("lr", "prior_lr")
SCHEDULED_STEPS = {"lr_schedule": "steps", "prior_lr_schedule": "prior_steps"}   # schedule option: its length


def flag(name: str) -> str:
    """The command-line flag of an option: lr_schedule -> --lr-schedule."""
    return "--" + name.replace("_", "-")


def check_resume(path: Path, saved: dict | None, now: dict, resumable) -> dict:
    """Refuse to resume a checkpoint trained with other options (except the resumable ones, and
    learning rates lowered, which are returned as {option: (before, now)}), naming each change;
    a learning-rate schedule other than constant also fixes the steps it spans. The options
    include the training data's content key and the number of processes."""
    if saved is None or "world_size" not in saved:
        raise SystemExit(f"--resume: {path} does not record the options, data and processes it was trained "
                         "with (an older version wrote it): train into another --out")
    if saved.get("experiment", now.get("experiment")) != now.get("experiment"):
        raise SystemExit(f"--resume: {path} was written by the {saved['experiment']} experiment, not by this "
                         f"{now['experiment']} one: train into another --out")
    fixed = {k for k in saved.keys() | now.keys() if k not in resumable}
    scheduled = {steps: schedule for schedule, steps in SCHEDULED_STEPS.items()
                 if now.get(schedule) not in (None, "constant")}
    fixed |= scheduled.keys()
    lowered = {k: (saved[k], now[k]) for k in LOWERABLE if k in fixed and isinstance(saved.get(k), float)
               and isinstance(now.get(k), float) and now[k] < saved[k]}
    changed = sorted(k for k in fixed - lowered.keys() if saved.get(k) != now.get(k))
    if changed:
        special = {"training_data": lambda a, b: f"other training data (content key {a}, now {b})",
                   "world_size": lambda a, b: f"{a} process(es) (now {b}: another global batch)"}
        listed = ", ".join(special.get(k, lambda a, b: f"{flag(k)} {a} (now {b})")(saved.get(k), now.get(k))
                           for k in changed)
        why = "".join(f" (the {flag(scheduled[k])} {now[scheduled[k]]} rates depend on {flag(k)})"
                      for k in changed if k in scheduled and scheduled[k] not in changed)
        raise SystemExit(f"--resume: {path} was trained with {listed}{why}; resume with those values, or train "
                         "into another --out")
    return lowered


def check_made_for(path: Path, state: dict, vqvae_id: str | None) -> None:
    """A prior is only valid for the codes of the VQ-VAE it was trained on (model_fingerprint)."""
    made_for = state.get("vqvae_id", "an unrecorded VQ-VAE")
    if made_for != vqvae_id:
        raise SystemExit(f"{path.name} was fitted to the codes of another VQ-VAE ({made_for}), not to the one in "
                         f"vqvae.pt ({vqvae_id}): delete {path.name} to fit a new prior")


def check_data(path: Path, trained_on: str | None, now: str | None) -> None:
    """A model is read back only with the training data it was trained on (their content keys)."""
    if trained_on and now and trained_on != now:
        raise SystemExit(f"{path} was trained on other data (content key {trained_on}, now "
                         f"{now}): use the data it was trained on, or another --out")


# ----------------------------------------------------------------------------- folders and memory
def check_writable(folder: Path, option: str = "--data-dir") -> None:
    """Refuse, before any decoding, a folder that cannot be created or written, found by creating it
    and a temporary file in it (os.access trusts a root user's permissions even on /proc)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SystemExit(f"{option} {folder}: cannot be created or written ({e.strerror or e})") from None


def check_outside(folder: Path, option: str, data: Path | None) -> None:
    """Refuse a folder the run writes into (--out, --data-dir) inside the --data folder it reads: its
    own files (figures, caches) would be read as data by the next run."""
    if data is not None and data.is_dir() and folder.resolve().is_relative_to(data.resolve()):
        raise SystemExit(f"{option} {folder}: inside --data {data}, where the run's own files would be read as "
                         "data; choose a folder outside it")


def available_memory(device: torch.device) -> int:
    """Bytes free for tensors: the GPU's free memory, or the host's MemAvailable (Linux), else 0."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def check_fits(what: str, floats: int, device: torch.device, advice: str) -> None:
    """Refuse, before any training, `what` of `floats` float32 values that this device cannot hold."""
    needed, free = 4 * floats, available_memory(device)
    if free and needed > free:
        raise SystemExit(f"{what} needs about {needed / 2**30:.1f} GiB on {device}, which has {free / 2**30:.1f} "
                         f"GiB free: {advice}")


# ----------------------------------------------------------------------------- divergence
EXPLODING = 10.0   # a checkpoint's loss above this many times the run's first loss is not good


def non_finite(loss: torch.Tensor, parameters, one_process: bool) -> torch.Tensor:
    """A device flag: the total gradient norm of `parameters` is not finite, or (on one process:
    under DDP a process's loss is its own, the gradients are all-reduced) the loss is not."""
    grads = [p.grad for p in parameters if p.grad is not None]
    bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
    return bad | ~torch.isfinite(loss.detach()) if one_process else bad


def check_good(name: str, step: int, loss: float, first_loss: float, model: torch.nn.Module, last_good: str) -> None:
    """A checkpoint is good if its weights are finite and give, on the next batch, a finite loss no
    more than EXPLODING times the run's first loss (`first_loss`, that of its first step): weights
    a too large step sent off are finite at first, with a loss of 1e22. Raises diverged otherwise."""
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise diverged(name, step, "a weight is not finite", last_good)
    if not math.isfinite(loss):
        raise diverged(name, step, "the loss is not finite", last_good)
    if abs(loss) > EXPLODING * max(abs(first_loss), 1e-8):
        raise diverged(name, step, f"the loss is exploding ({loss:.3g} on the next batch, over {EXPLODING:g}x the "
                                   f"first step's {first_loss:.3g})", last_good)


def diverged(name: str, step: int, what: str, last_good: str) -> SystemExit:
    """The refusal of a run in which `what` happened at `step`: nothing is saved. last_good, "none" or
    "<path> (step N)", is where a lower learning rate goes on."""
    advice = ("--resume with a lower --lr continues from it" if last_good != "none"
              else "start again with a lower --lr")
    return SystemExit(f"[{name}] step {step}: {what}; stopped without saving. Last good checkpoint: {last_good}: "
                      f"{advice}.")
