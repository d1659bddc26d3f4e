"""What the training scripts share: processes and devices, seeds, atomic checkpoints, Ctrl-C,
the resumable training loop, a progress line with rate and ETA, metrics.json and figures.
No model code (see vqvae.py).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import vqvae


# ----------------------------------------------------------------------------- processes, seeds
@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(seed: int, device: str = "auto") -> Env:
    """Device (CUDA when present), torch.distributed from torchrun's variables, and seeds.

    Every process gets the same seed, so that models start identical; data are sharded by rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    torch.manual_seed(seed)
    return Env(torch.device(device), rank, world_size)


def teardown() -> None:
    """End the process group, every process together (they meet at a barrier first). The scripts
    call this after the training stages, before the main process evaluates alone; the processes
    that leave then exit through run_main."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def stopped() -> NoReturn:
    """End a run that was interrupted (its checkpoint saved) with the shell's status for Ctrl-C."""
    teardown()
    raise SystemExit(130)


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main(). Under torchrun the process then ends as multiprocessing's children
    do: the atexit handlers, a flush, and os._exit with main's status (0 on return, else SystemExit's).

    Why: DDP leaves references to the gloo process group behind, so destroy_process_group does not
    stop its worker threads. A worker that releases the last collective's tensors after Python has
    begun to finalize asks for the GIL, Python ends that thread, and the unwinding aborts the
    process ("terminate called without an active exception"). os._exit never finalizes. An
    uncaught exception still propagates as usual. tests/stress_distributed_exit.py checks the exits."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return main()
    try:
        main()
        status = 0
    except SystemExit as e:  # reported as Python would report it
        status = 0 if e.code is None else e.code
        if not isinstance(status, int):
            print(status, file=sys.stderr)
            status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def batch_indices(step: int, dataset_size: int, batch_size: int, seed: int, env: Env) -> torch.Tensor:
    """Indices of the batch of this process at `step`: a seeded permutation per epoch, sharded
    by rank. A pure function of the step, so that a resumed run sees exactly the same batches."""
    per_epoch = dataset_size // (batch_size * env.world_size)
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} x {env.world_size} processes exceeds the dataset ({dataset_size})")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = (i * env.world_size + env.rank) * batch_size
    return perm[start:start + batch_size]


def read_metrics(metrics: dict, device) -> dict[str, float]:
    """Metrics (0-dim tensors or numbers) averaged over processes, as floats: one collective and
    one device-to-host copy for all of them."""
    values = torch.stack([torch.as_tensor(v).detach().to(device, torch.float64) for v in metrics.values()])
    return dict(zip(metrics, all_reduce_mean(values).tolist()))


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def check_replicas_equal(name: str, x: torch.Tensor) -> None:
    """Raise unless x is bitwise the same on every process (e.g. the EMA codebook)."""
    if not dist.is_initialized():
        return
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.detach().contiguous())
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"{name} differs between processes")
    if dist.get_rank() == 0:
        print(f"{name} identical on all {len(gathered)} processes", flush=True)


# ----------------------------------------------------------------------------- command line
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_run_arguments(p, stages: str, log_every: int, checkpoint_every: int) -> None:
    """The options every training script has: output, stages, resume, seed, device, logging."""
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<script>_<preset>)")
    p.add_argument("--stages", default=stages, help=f"comma-separated subset of {stages}")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--log-every", type=int, default=log_every, help="steps between history points")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="steps between checkpoints")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                   help="mixed precision of the training steps (autocast; fp16 with a gradient scaler); the "
                        "quantizer always runs in float32. Off by default: not yet measured to help where it should "
                        "(a GPU, a CPU with AMX)")


def none_or_float(text: str) -> float | None:
    """An option's value: a number, or 'none' (off)."""
    return None if text == "none" else float(text)


def add_codebook_arguments(g) -> None:
    """The quantizer's options, named after VQVAEConfig's fields (defaults from the preset)."""
    g.add_argument("--embedding-dim", type=int, help="D")
    g.add_argument("--num-embeddings", type=int, help="K")
    g.add_argument("--decay", type=none_or_float, help="EMA decay of the codebook (App. A.1), or 'none' for the codebook loss")
    g.add_argument("--commitment-cost", type=float, help="beta of Eq. 3")
    g.add_argument("--kmeans-init", action=argparse.BooleanOptionalAction, default=False,
                   help="codebook from k-means on the first batch (not in the paper)")
    g.add_argument("--dead-code-threshold", type=none_or_float,
                   help="restart codes whose moving-average use per batch falls below it, or 'none' (not in the paper)")


def add_encoder_arguments(g, what: str = "encoder and decoder") -> None:
    """Sizes of the convolutional encoder (and decoder), named after the config fields."""
    g.add_argument("--hidden-channels", type=int, help=f"hidden units of the {what}")
    g.add_argument("--res-channels", type=int, help="hidden units inside the residual blocks")
    g.add_argument("--num-res-layers", type=int, help="residual blocks")


def add_optimizer_arguments(g, batch_help: str = "per process") -> None:
    """Adam's learning rate, the batch size and the number of steps of the first model."""
    g.add_argument("--lr", type=float, help="Adam's learning rate")
    g.add_argument("--batch-size", type=int, help=batch_help)
    g.add_argument("--steps", type=int, help="training steps")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help="constant: --lr throughout; cosine: from --lr down to 0 over --steps; cooldown: "
                        "--lr, then linearly down to 0 over the last 20%% of --steps")


LR_SCHEDULES = ("constant", "cosine", "cooldown")
COOLDOWN_FRACTION = 0.2


def learning_rate(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of `step` (0-based) of `steps`: a pure function of the step, so that a
    resumed run continues the schedule exactly.

    cosine: lr * (1 + cos(pi * step / steps)) / 2 (Loshchilov & Hutter, "SGDR", 2017, without
    restarts). cooldown: lr, then lr * (steps - step) / c over the last c = COOLDOWN_FRACTION *
    steps steps (a constant rate with a linear cool-down, as in Zhai et al., "Scaling Vision
    Transformers", 2022, and Haegele et al., "Scaling Laws and Compute-Optimal Training Beyond
    Fixed Training Durations", 2024). Raises ValueError for another schedule."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule: expected one of {LR_SCHEDULES}; got {schedule!r}")
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * step / steps))
    if schedule == "cooldown":
        return lr * min(1.0, (steps - step) / (COOLDOWN_FRACTION * steps))
    return lr


def set_learning_rate(optimizer, lr: float, schedule: str, step: int, steps: int) -> None:
    """Every parameter group of optimizer to learning_rate(lr, schedule, step, steps)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(lr, schedule, step, steps)


def add_prior_arguments(g) -> None:
    """The prior's size (--prior-<field of its config>) and optimisation."""
    g.add_argument("--prior-channels", type=int, help="channels of the prior's layers")
    g.add_argument("--prior-num-layers", type=int, help="layers of the prior")
    g.add_argument("--prior-lr", type=float, help="Adam's learning rate")
    g.add_argument("--prior-batch-size", type=int, help="per process")
    g.add_argument("--prior-steps", type=int, help="training steps")


def config_from_args(config_class, args, prefix: str = "", **values):
    """config_class from the options named after its fields (--<prefix><field>), then `values`."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    given = {name: getattr(args, prefix + name) for name in fields if hasattr(args, prefix + name)}
    return config_class(**{**given, **values})


# Numeric options, by the values they accept (names not in a script are ignored). A training
# stage is skipped by leaving it out of --stages, so step counts start at 1.
AT_LEAST_ONE = {"batch_size", "prior_batch_size", "steps", "prior_steps", "clf_steps", "log_every",
                "checkpoint_every", "hidden_channels", "outer_channels", "res_channels", "embedding_dim",
                "num_embeddings", "num_groups", "prior_channels", "prior_num_layers", "prior_cycle", "crop",
                "episodes", "test_episodes", "episode_length", "frame_skip", "max_hold", "prior_context_frames",
                "prior_context_channels", "prior_context_layers", "wavenet_channels", "skip_channels",
                "wavenet_layers", "dilation_cycle", "sample_rate", "max_train_images", "max_test_images",
                "max_train_clips", "max_test_clips", "max_clips_per_speaker", "eval_clips", "eval_draws"}
AT_LEAST_ZERO = {"num_res_layers", "wav_clips"}
POSITIVE = {"lr", "prior_lr", "temperature", "clip_seconds", "dead_code_threshold"}
NON_NEGATIVE = {"commitment_cost"}


def check_numbers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse out-of-range numeric options (given or from a preset) before any work, one line each."""
    for name, value in vars(args).items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = "--" + name.replace("_", "-")
        if name in AT_LEAST_ONE and value < 1:
            p.error(f"{flag}: expected an integer >= 1 (leave a stage out of --stages to skip it); got {value}")
        if name in AT_LEAST_ZERO and value < 0:
            p.error(f"{flag}: expected an integer >= 0; got {value}")
        if name in POSITIVE and not (math.isfinite(value) and value > 0):
            p.error(f"{flag}: expected a finite number > 0; got {value}")
        if name in NON_NEGATIVE and not (math.isfinite(value) and value >= 0):
            p.error(f"{flag}: expected a finite number >= 0; got {value}")
    if getattr(args, "decay", None) is not None and not 0 <= args.decay < 1:
        p.error(f"--decay: expected a number in [0, 1), or 'none'; got {args.decay}")


def _shown(value) -> str:
    return "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else str(value)


def parse_with_presets(p, presets: dict, argv, out_prefix: str):
    """Parse twice: the preset chosen first sets the defaults, then any option given wins. Numeric
    options and --stages are checked. --help lists each option's value in every preset."""
    for action in p._actions:
        if any(action.dest in preset for preset in presets.values()):
            values = ", ".join(f"{name} {_shown(preset.get(action.dest, action.default))}"
                               for name, preset in presets.items())
            action.help = f"{action.help or ''} [{values}]".lstrip()
    p.set_defaults(**presets[p.parse_known_args(argv)[0].preset])
    args = p.parse_args(argv)
    args.out = args.out or Path("runs") / f"{out_prefix}_{args.preset}"
    valid = p.get_default("stages").split(",")
    args.stages = set(args.stages.split(","))
    if not args.stages <= set(valid):
        p.error(f"--stages: expected a subset of {','.join(valid)}; got {','.join(sorted(args.stages))}")
    check_numbers(p, args)
    return args


def lock_out(out: Path) -> None:
    """The scripts' first step: create --out and its lock file `.lock` (holding this process id),
    removed at exit. A folder that cannot be written is refused, and so is a second run on the same
    folder while the first lives; a lock left by a dead process is taken over with a message. Under
    torchrun, process 0 speaks for the run."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        _lock(out / ".lock")
    except OSError as e:
        raise SystemExit(f"--out {out}: not a writable folder ({e.strerror or e})") from e


def _lock(lock: Path) -> None:
    out = lock.parent
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                if pid == os.getpid():
                    return  # this process holds it already (main() called again, as tests do)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                print(f"{lock}: left by a process that no longer runs; taking it over", flush=True)
                lock.unlink(missing_ok=True)
                continue
            except PermissionError:
                pass  # alive, under another user
            raise SystemExit(f"--out {out}: another run (process {pid}) is using this folder; wait for it to "
                             f"end or choose another --out (delete {lock} if that process is not a run)")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        pid = os.getpid()
        atexit.register(lambda: lock.unlink(missing_ok=True) if os.getpid() == pid else None)
        return


def vq_metrics(out) -> dict[str, torch.Tensor]:
    """The numbers to log of a VQ-VAE output: 0-dim tensors of this process (see run_loop)."""
    metrics = {"loss": out.loss, "recon_loss": out.recon_loss, "commitment_loss": out.commitment_loss,
               "perplexity": out.perplexity, "codes_used": (out.counts > 0).sum().float()}
    return {k: v.detach() for k, v in metrics.items()}


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


def image_metrics(mse: float, data_variance: float, codes: torch.Tensor, num_embeddings: int) -> dict:
    """Test-set numbers of an image or frame VQ-VAE: mse (pixels in [0, 1]), NMSE (Sonnet's: mse over
    the training data's variance), PSNR, and the code usage (perplexity of all test codes, codes used)."""
    counts = torch.bincount(codes.long().flatten(), minlength=num_embeddings).double()
    return {"test_mse": mse, "test_nmse": mse / data_variance, "test_psnr_db": 10 * math.log10(1 / mse),
            "test_perplexity": math.exp(torch.special.entr(counts / counts.sum()).sum().item()),
            "test_codes_used": int((counts > 0).sum())}


# ----------------------------------------------------------------------------- checkpoints
CACHE_FORMAT = 1  # part of every data-cache key: bump when a script's decoding changes


def source_key(source: Path, *settings) -> str:
    """16 hex digits of SHA-256 over what a decoded cache is made from: the decoding settings, and a
    file's bytes or a folder's sorted list of files with their sizes and modification times (ns)."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT} {settings}\n".encode())
    if source.is_dir():
        for f in sorted(source.rglob("*")):
            if f.is_file():
                stat = f.stat()
                digest.update(f"{f.relative_to(source)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


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


def save_npz(path: Path, arrays: dict) -> None:
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays))


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save, fsynced, through write_atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    write_atomically(path, write)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# Every model of vqvae.py and its config class: a checkpoint names its class (model_state).
MODEL_CLASSES = {model.__name__: (model, config) for model, config in (
    (vqvae.VQVAE, vqvae.VQVAEConfig), (vqvae.AudioVQVAE, vqvae.AudioVQVAEConfig),
    (vqvae.GatedPixelCNN, vqvae.GatedPixelCNNConfig), (vqvae.WaveNet, vqvae.WaveNetConfig),
    (vqvae.ActionConditionalPrior, vqvae.ActionConditionalPriorConfig))}
MODELS = tuple(model for model, _ in MODEL_CLASSES.values())


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
    model = model_class(config_class(**state["config"])).to(device)
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


def check_prior_matches(prior_state: dict, vqvae_id: str) -> None:
    """A prior is only valid for the codes of the VQ-VAE it was trained on (model_fingerprint)."""
    made_for = prior_state.get("vqvae_id", "an unrecorded VQ-VAE")
    if made_for != vqvae_id:
        raise SystemExit(f"prior.pt was fitted to the codes of another VQ-VAE ({made_for}), not to the one in "
                         f"vqvae.pt ({vqvae_id}): delete prior.pt to fit a new prior")


def load_prior(path: Path, vqvae_id: str, device="cpu"):
    """(prior in eval mode, its history) from a prior checkpoint; refused if it was fitted to the
    codes of another VQ-VAE."""
    if not Path(path).exists():
        raise SystemExit(f"{path} not found: run the prior stage first")
    prior, state = load_model(path, device)
    check_prior_matches(state, vqvae_id)
    return prior, state["history"]


def load_run(out: str | Path, device="cpu"):
    """(VQ-VAE, prior or None), both in eval mode, from a run's --out folder, of any of the three
    scripts: how to reuse a trained model. The prior is refused if it was fitted to the codes of
    another VQ-VAE."""
    out = Path(out)
    model, state = load_model(out / "vqvae.pt", device)
    prior = None
    if (out / "prior.pt").exists():
        prior, _ = load_prior(out / "prior.pt", model_fingerprint(state), device)
    return model, prior


def write_json(path: str | Path, obj) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def checkpoint_options(out: Path, options: dict) -> dict:
    """{checkpoint file name: the options it was trained with that differ from `options`} for each
    checkpoint in `out` that records them ({} where all agree): a run that only evaluates models
    trained by an earlier command records here what they were trained with."""
    found = {}
    for path in sorted(Path(out).glob("*.pt")):
        saved = load_checkpoint(path).get("options")
        if saved is not None:
            found[path.name] = {k: saved.get(k) for k in sorted(saved.keys() | options.keys())
                                if k not in ("stages", "resume") and saved.get(k) != options.get(k)}
    return found


def write_report(run: Run, metrics: dict, model_config, elapsed: float, timings: dict, env: Env, **extra) -> None:
    """<out>/metrics.json: the metrics, this command's options ("config") and, per checkpoint, the
    options it was trained with where they differ (checkpoint_options), model config, timings."""
    write_json(run.out / "metrics.json", {
        "metrics": metrics, "config": run.options, "checkpoint_options": checkpoint_options(run.out, run.options),
        "model_config": dataclasses.asdict(model_config),
        "timings": {**timings, "total_seconds": elapsed}, "torch": torch.__version__,
        "quantizer_backend": vqvae.quantizer_backend(env.device), "world_size": env.world_size,
        "threads": torch.get_num_threads(), **extra})
    print("test: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    print(f"wrote {run.out}/metrics.json and figures", flush=True)


class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag the loop checks between steps, so that the
    checkpoint written on the way out is of a finished step; a second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def should_stop(self) -> bool:
        """True on every process as soon as any process was asked to stop."""
        if not dist.is_initialized():
            return self.requested
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


# ----------------------------------------------------------------------------- progress
def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One line per `interval` seconds: step/total, metrics, steps/s and ETA."""

    def __init__(self, name: str, total: int, start: int = 0, interval: float = 10.0, enabled: bool = True):
        self.name, self.total, self.start, self.interval, self.enabled = name, total, start, interval, enabled
        self.t0 = self.last = time.perf_counter()

    def update(self, step: int, **metrics: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.interval and step < self.total):
            return
        self.last = now
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"[{self.name}] {step}/{self.total} {shown} | {rate:.2f} it/s | ETA {_duration(eta)}", flush=True)

    def rate(self, step: int) -> float:
        """Steps per second since this run (or resume) began."""
        return (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# ----------------------------------------------------------------------------- training loop
# Options a resumed run may change: how far to train, what to log and save, which stages, where;
# and those that only shape the evaluation. Any other change would silently mix two runs.
RESUMABLE_OPTIONS = {"steps", "prior_steps", "clf_steps", "log_every", "checkpoint_every", "stages", "resume",
                     "out", "device", "data_dir", "max_test_images", "max_test_clips", "eval_clips", "wav_clips",
                     "temperature", "guidance", "eval_draws"}
SCHEDULED_STEPS = {"lr_schedule": "steps", "prior_lr_schedule": "prior_steps"}   # schedule option: its length


@dataclass
class Run:
    """What the training loop needs of a run: where it writes, whether it resumes, how often it
    logs and saves, its mixed precision (a key of AMP_DTYPES), and all its options as plain values
    (recorded in checkpoints and metrics.json, compared on resume)."""
    out: Path
    resume: bool = False
    log_every: int = 100
    checkpoint_every: int = 1000
    amp: str = "off"
    options: dict = dataclasses.field(default_factory=dict)


def start(args: argparse.Namespace) -> tuple[Run, Env]:
    """A script's first steps: lock its --out (lock_out), its Run, then processes, device and seed."""
    lock_out(args.out)
    return run_settings(args), setup(args.seed, args.device)


def run_settings(args: argparse.Namespace) -> Run:
    """The Run of a script's parsed options (those of add_run_arguments, and all for `options`)."""
    options = {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
               for k, v in vars(args).items()}
    return Run(args.out, args.resume, args.log_every, args.checkpoint_every, args.amp, options)


def check_resume_options(path: Path, saved: dict | None, options: dict) -> None:
    """Refuse to resume a checkpoint with options other than those it was trained with (except
    RESUMABLE_OPTIONS), naming each difference; a learning-rate schedule other than constant also
    fixes the steps it spans (SCHEDULED_STEPS)."""
    if saved is None:
        raise SystemExit(f"--resume: {path} does not record the options it was trained with (an older "
                         "version wrote it): train into another --out")
    fixed = {k for k in saved.keys() | options.keys() if k not in RESUMABLE_OPTIONS}
    scheduled = {steps: schedule for schedule, steps in SCHEDULED_STEPS.items()
                 if options.get(schedule) not in (None, "constant")}
    fixed |= scheduled.keys()
    changed = sorted(k for k in fixed if saved.get(k) != options.get(k))
    if changed:
        flag = lambda k: "--" + k.replace("_", "-")
        listed = ", ".join(f"{flag(k)} {saved.get(k)} (now {options.get(k)})" for k in changed)
        why = "".join(f" (the {flag(scheduled[k])} {options[scheduled[k]]} rates depend on {flag(k)})"
                      for k in changed if k in scheduled and scheduled[k] not in changed)
        raise SystemExit(f"--resume: {path} was trained with {listed}{why}; resume with those values, or train "
                         "into another --out")


def continue_log(path: Path, step: int) -> None:
    """Keep the lines of a live-metrics log up to `step` (a run resumed from its checkpoint at that
    step would repeat the later ones), or start it empty for a run from step 0."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() and step > 0 else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    write_atomically(path, lambda tmp: tmp.write_text("".join(kept)))


def resume(name: str, ckpt_path: Path, run: Run, env: Env, model, optimizer, scaler) -> tuple[dict, int]:
    """(history, step) of a run that starts: from its checkpoint with --resume (model, optimizer,
    scaler and random state restored, its options checked), else empty at step 0. A checkpoint
    without --resume is refused, so that no run is overwritten by mistake."""
    if not ckpt_path.exists():
        if run.resume and env.is_main:
            print(f"[{name}] --resume: no {ckpt_path} yet; starting from step 0", flush=True)
        return {"step": []}, 0
    if not run.resume:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or another --out")
    state = load_checkpoint(ckpt_path)
    check_resume_options(ckpt_path, state.get("options"), run.options)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if env.is_main:
        print(f"[{name}] resumed at step {state['step']} from {ckpt_path}", flush=True)
    return state["history"], state["step"]


def stop_unsaved(name: str, step: int, what: str, ckpt_path: Path) -> NoReturn:
    """End a run whose metric or weight `what` is not finite, keeping its last good checkpoint."""
    saved = f"{ckpt_path} (step {load_checkpoint(ckpt_path)['step']})" if ckpt_path.exists() else "none"
    raise SystemExit(f"[{name}] step {step}: {what} is not finite; stopped without saving. "
                     f"Last good checkpoint: {saved}. Try a lower learning rate.")


def record(history: dict, log, step: int, metrics: dict[str, float], **extra: float) -> None:
    """A history point: appended to history, and as one flushed JSON line to log (None on processes
    other than the main one)."""
    history["step"].append(step)
    for k, v in metrics.items():
        history.setdefault(k, []).append(v)
    if log is not None:
        log.write(json.dumps({"step": step, **metrics, **extra}) + "\n")
        log.flush()


def run_loop(name: str, model, optimizer, loss_fn, total_steps: int, run: Run, env: Env, extra_state=None):
    """The training loop every model of the scripts shares: resume, steps, history, checkpoints
    (<out>/<name>.pt, with model_state when the model is one of vqvae.py), Ctrl-C. Each history
    point is also appended to <out>/<name>.jsonl as one flushed JSON line (step, metrics, lr,
    steps_per_s), to follow or plot a run while it trains.

    loss_fn(ddp_model, step) -> (loss, {metric: 0-dim tensor of this process}). The metrics are
    averaged over processes and read back to the host only at log steps (one synchronisation), so
    that a GPU never waits for the host in between. A non-finite metric at a log step, or a
    non-finite weight at a checkpoint, ends the run (SystemExit) without saving. Returns the
    history, or None if stopped early.
    """
    ckpt_path = run.out / f"{name}.pt"
    amp = AMP_DTYPES[run.amp]
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)
    history, step = resume(name, ckpt_path, run, env, model, optimizer, scaler)
    ddp = DistributedDataParallel(model) if env.world_size > 1 else model

    def save():
        if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
            stop_unsaved(name, step, "a weight", ckpt_path)
        if env.is_main:
            weights = model_state(model) if isinstance(model, MODELS) else {"model": model.state_dict()}
            save_checkpoint(ckpt_path, {**weights, "optimizer": optimizer.state_dict(),
                                        "rng": torch.get_rng_state(), "history": history,
                                        "step": step, "options": run.options, **(extra_state or {}),
                                        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})})

    progress = Progress(name, total_steps, step, enabled=env.is_main)
    model.train()
    shown = {}
    log_path = ckpt_path.with_name(f"{name}.jsonl")
    if env.is_main:
        continue_log(log_path, step)
    with StopRequest() as stop, open(log_path, "a") if env.is_main else contextlib.nullcontext() as log:
        if env.is_main:
            precision = "float32 (--amp off)" if amp is None else f"mixed precision ({run.amp})"
            print(f"[{name}] training to step {total_steps} from step {step} in {precision}", flush=True)
        while step < total_steps:
            with torch.autocast(env.device.type, dtype=amp, enabled=amp is not None):
                loss, metrics = loss_fn(ddp, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # with fp16, scaled against underflow; else as it is
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if step % run.log_every == 0 or step == total_steps:
                shown = read_metrics(metrics, env.device)  # the same numbers on every process
                bad = [k for k, v in shown.items() if not math.isfinite(v)]
                if bad:  # every process stops here together
                    stop_unsaved(name, step, ", ".join(bad), ckpt_path)
                record(history, log, step, shown, lr=optimizer.param_groups[0]["lr"], steps_per_s=progress.rate(step))
            progress.update(step, **shown)
            if step % run.checkpoint_every == 0 or step == total_steps:
                save()
            if stop.should_stop():
                save()
                if env.is_main:
                    print(f"[{name}] stopped at step {step}; checkpoint {ckpt_path}; continue with --resume", flush=True)
                return None
    if env.is_main:
        print(f"[{name}] {total_steps} steps done in {progress.elapsed():.0f} s", flush=True)
    return history


def train_vqvae(config: vqvae.VQVAEConfig, batch, lr: float, steps: int, run: Run, env: Env,
                lr_schedule: str = "constant"):
    """The VQ-VAE stage of the image and frame scripts: Adam at lr (under lr_schedule, see
    learning_rate) for `steps` steps on batch(step) -> x (B, C, H, W), into <out>/vqvae.pt.
    Returns (model, history or None if stopped)."""
    model = vqvae.VQVAE(config).to(env.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss_fn(ddp, step):
        set_learning_rate(optimizer, lr, lr_schedule, step, steps)
        out = ddp(batch(step))
        return out.loss, vq_metrics(out)

    history = run_loop("vqvae", model, optimizer, loss_fn, steps, run, env)
    check_replicas_equal("codebook", model.quantizer.codebook)
    return model, history


# ----------------------------------------------------------------------------- figures
def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no window), imported when first drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_image_rows(path: str | Path, rows: list[tuple[str, torch.Tensor]], title: str = "",
                    divider: int | None = None) -> None:
    """A grid with one labelled row per (label, images (N, C, H, W) in [0, 1]); with divider d, a
    red line through all rows between columns d - 1 and d (e.g. where real frames end)."""
    plt = pyplot()
    n = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 0.95 + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                image = images[c].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
                ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
        axes[r][0].text(-2, images.shape[-2] / 2, label, ha="right", va="center", fontsize=8)
    if divider is not None:
        left, right = axes[0][divider - 1].get_position(), axes[0][divider].get_position()
        x, bottom = (left.x1 + right.x0) / 2, axes[-1][divider].get_position().y0
        fig.add_artist(plt.Line2D([x, x], [bottom, left.y1], transform=fig.transFigure, color="red", linewidth=1.5))
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_history(path: str | Path, history: dict[str, list[float]], keys: list[str], title: str = "") -> None:
    """One panel per key of a history {"step": [...], key: [...]}, against step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(history["step"], history[key])
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=9)
        if key.endswith("loss") and min(history[key], default=1) > 0:
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_code_usage(path: str | Path, counts: torch.Tensor, title: str = "") -> None:
    """Bar chart of code usage, most used first, with the number of codes in use."""
    plt = pyplot()
    counts = counts.double().cpu()
    ordered = counts.sort(descending=True).values
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(ordered)), (ordered / ordered.sum()).numpy(), width=1.0)
    ax.set_xlabel("code (sorted by usage)")
    ax.set_ylabel("fraction of latents")
    ax.set_title(f"{title} {int((counts > 0).sum())}/{len(counts)} codes in use", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
