"""The run machinery: processes and devices, the lock on --out, the resumable training loop with
its checkpoints, Ctrl-C, the non-finite guard, progress with rate and ETA, and metrics.json.

A script makes one Run (Run.start) and calls run.train for each model it fits, run.load for each
it reads back, run.end_training before it evaluates, and run.report at the end."""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lab.checkpoints import (MODELS, cached, content_key, load_checkpoint, load_model, model_fingerprint,
                             model_state, save_checkpoint, write_atomically, write_json)

try:
    import vqvae_ext
except ImportError:
    vqvae_ext = None


class DataError(SystemExit):
    """A missing, corrupt or unrecognised data source; the message names it and says what to do.
    A SystemExit: uncaught, it ends the program with its message and exit status 1."""


# ----------------------------------------------------------------------------- processes
@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_device(text: str) -> torch.device:
    """--device: auto (CUDA when present), cpu, cuda or cuda:N; refused in one line otherwise."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise SystemExit(f"--device: expected auto, cpu, cuda or cuda:N; got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: no CUDA GPU is visible to torch {torch.__version__} (a CPU build, or no "
                         "driver); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected auto, cpu, cuda or cuda:N; got {text!r}")
    return device


def setup(seed: int, device: str = "auto") -> Env:
    """Device, torch.distributed from torchrun's variables, and seeds. Every process gets the same
    seed, so that models start identical; data are sharded by rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = parse_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else (device.index or 0)
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    torch.manual_seed(seed)
    return Env(device, rank, world_size)


def teardown() -> None:
    """End the process group, every process together (they meet at a barrier first)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main(). Under torchrun the process then ends as multiprocessing's children do: the atexit handlers, a flush, and os._exit
    with main's status. Why: DDP leaves references to the gloo process group behind, and a worker
    thread that releases the last collective's tensors after Python has begun to finalize aborts
    the process ("terminate called without an active exception"); os._exit never finalizes.
    tests/stress_distributed_exit.py checks the exits."""
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


def read_metrics(metrics: dict, device) -> dict[str, float]:
    """Metrics (0-dim tensors or numbers) averaged over processes, as floats: one collective and
    one device-to-host copy for all of them."""
    values = torch.stack([torch.as_tensor(v).detach().to(device, torch.float64) for v in metrics.values()])
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(metrics, values.tolist()))


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


def quantizer_backend(device) -> str:
    """What runs the quantizer's nearest-code search on `device`: "extension: CPU", "extension: CUDA
    sm_XY" or "PyTorch" (vqvae_ext.describe, which warns once where the extension cannot run)."""
    return vqvae_ext.describe(device) if vqvae_ext is not None else "PyTorch"


# ----------------------------------------------------------------------------- the lock
def lock_out(out: Path) -> None:
    """Create --out and its lock file `.lock` (holding this process id), removed at exit. A folder
    that cannot be written is refused, and so is a second run on it while the first lives; a lock
    left by a dead process is taken over with a message, and so are the temporary files it left
    (a kill during a checkpoint write). Under torchrun, process 0 speaks for the run."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        _lock(out / ".lock")
    except OSError as e:
        raise SystemExit(f"--out {out}: not a writable folder ({e.strerror or e})") from e
    for tmp in sorted(out.glob("*.tmp*")):   # with the lock held, no live writer owns one
        if tmp.is_file():
            print(f"{tmp}: left by an interrupted write; deleted", flush=True)
            tmp.unlink(missing_ok=True)


def _lock(lock: Path) -> None:
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
            raise SystemExit(f"--out {lock.parent}: another run (process {pid}) is using this folder; wait for it to "
                             f"end or choose another --out (delete {lock} if that process is not a run)")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        pid = os.getpid()
        atexit.register(lambda: lock.unlink(missing_ok=True) if os.getpid() == pid else None)
        return


# ----------------------------------------------------------------------------- learning rate
COOLDOWN_FRACTION = 0.2


def learning_rate(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of `step` (0-based) of `steps`: a pure function of the step, so that a
    resumed run continues the schedule exactly. cosine: lr (1 + cos(pi step / steps)) / 2
    (Loshchilov & Hutter, "SGDR", 2017, without restarts); cooldown: lr, then linearly down to 0
    over the last COOLDOWN_FRACTION of the steps (Zhai et al. 2022; Haegele et al. 2024).
    Raises ValueError for another schedule."""
    if schedule not in ("constant", "cosine", "cooldown"):
        raise ValueError(f"schedule: expected constant, cosine or cooldown; got {schedule!r}")
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * step / steps))
    if schedule == "cooldown":
        return lr * min(1.0, (steps - step) / (COOLDOWN_FRACTION * steps))
    return lr


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


# ----------------------------------------------------------------------------- the run
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Learning rates a resumed run may lower (recorded in the checkpoint's "resumed" list): how a
# diverged run goes on from its last good checkpoint.
LOWERABLE = ("lr", "prior_lr")
SCHEDULED_STEPS = {"lr_schedule": "steps", "prior_lr_schedule": "prior_steps"}   # schedule option: its length


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Run:
    """One command of a script: where it writes, its options (recorded in every checkpoint and in
    metrics.json, compared on --resume), processes and device, and what its stages left behind."""
    out: Path
    env: Env
    resume: bool = False
    log_every: int = 100
    checkpoint_every: int = 1000
    amp: str = "off"
    options: dict = field(default_factory=dict)
    resumable: set = field(default_factory=set)
    histories: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    vqvae_id: str | None = None
    t0: float = field(default_factory=time.perf_counter)
    eval_t0: float | None = None     # when end_training let the main process evaluate

    @classmethod
    def start(cls, args) -> "Run":
        """A script's first steps: lock --out, then processes, device and seed (before any data is read)."""
        lock_out(args.out)
        options = {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                   for k, v in vars(args).items() if k != "resumable"}
        env = setup(args.seed, args.device)
        options["world_size"] = env.world_size   # a resume with another world size changes the batch
        return cls(args.out, env, args.resume, args.log_every, args.checkpoint_every, args.amp, options,
                   set(getattr(args, "resumable", ())))

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def describe(self) -> str:
        """"device cpu x 1; quantizer extension: CPU; out runs/cifar_quick": where the run computes."""
        return (f"device {self.device} x {self.env.world_size}; quantizer {quantizer_backend(self.device)}; "
                f"out {self.out}")

    def print(self, *text) -> None:
        """print on the main process only, flushed."""
        if self.is_main:
            print(*text, flush=True)

    def use_data(self, *arrays) -> None:
        """Record the training data's content key (checkpoints, caches): a resume on other data, or a
        cache made from other data, is refused or remade."""
        self.options["training_data"] = content_key(*arrays)

    def alone(self) -> "Run":
        """This run on this process alone, as after end_training (the process group is gone): a model
        it trains sees every example, and its timings join this run's."""
        return dataclasses.replace(self, env=Env(self.device))

    def batch(self, step: int, dataset_size: int, batch_size: int, seed: int) -> torch.Tensor:
        """Indices of this process's batch at `step`: a seeded permutation per epoch, sharded by
        rank. A pure function of the step, so that a resumed run sees exactly the same batches."""
        per_epoch = dataset_size // (batch_size * self.env.world_size)
        if per_epoch == 0:
            raise SystemExit(f"batch size {batch_size} x {self.env.world_size} process(es) exceeds the "
                             f"{dataset_size} training examples: choose a smaller batch")
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        start = (i * self.env.world_size + self.env.rank) * batch_size
        return perm[start:start + batch_size]

    # ------------------------------------------------------------------------- training
    def train(self, name: str, model, optimizer, loss_fn, steps: int, lr_schedule: str = "constant",
              made_for: str | None = None, extra: dict | None = None) -> dict:
        """Train `model` to `steps` steps into <out>/<name>.pt (resumed with --resume); returns its
        history. loss_fn(ddp_model, step) -> (loss, {metric: 0-dim tensor}), a function of the step.
        The lr follows lr_schedule from the optimizer's (learning_rate); metrics are averaged over
        processes and read back at log steps only, also into <out>/<name>.jsonl. Ctrl-C saves the
        finished step and exits 130. A non-finite loss or gradient stops the run (_step); a checkpoint
        is only written of finite weights that give a finite loss, and a diverged run resumes from
        it with a lower --lr. made_for: the VQ-VAE a prior is fitted to (checked on resume, load)."""
        t0, ckpt, amp = time.perf_counter(), self.out / f"{name}.pt", AMP_DTYPES[self.amp]
        scaler = torch.amp.GradScaler(self.device.type, enabled=amp == torch.float16)
        base_lr = optimizer.defaults["lr"]   # as constructed: a resume with a lowered --lr takes it
        history, step, resumed = self._resume(name, ckpt, model, optimizer, scaler, made_for)
        ddp = DistributedDataParallel(model) if self.env.world_size > 1 and dist.is_initialized() else model
        state = {"name": name, "ckpt": ckpt, "model": model, "optimizer": optimizer, "scaler": scaler, "amp": amp,
                 "history": history, "made_for": made_for, "extra": extra or {}, "resumed": resumed,
                 "bad": torch.zeros((), dtype=torch.bool, device=self.device)}
        progress, shown = Progress(name, steps, step, enabled=self.is_main), {}
        model.train()
        log_path = ckpt.with_name(f"{name}.jsonl")
        if self.is_main:
            _continue_log(log_path, step)
        with StopRequest() as stop, open(log_path, "a") if self.is_main else contextlib.nullcontext() as log:
            # Said once Ctrl-C is caught: from here on it stops after a finished step.
            self.print(f"[{name}] training to step {steps} from step {step} in "
                       f"{'float32 (--amp off)' if amp is None else f'mixed precision ({self.amp})'}")
            while step < steps:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(base_lr, lr_schedule, step, steps)
                metrics = self._step(state, loss_fn, ddp, step)
                step += 1
                if step % self.log_every == 0 or step == steps:
                    shown = read_metrics({**metrics, "_bad": state["bad"]}, self.device)
                    if shown.pop("_bad") or not all(map(math.isfinite, shown.values())):
                        self._diverged(name, step, "the loss, a gradient or a metric", ckpt)
                    _record(history, log, step, shown, lr=optimizer.param_groups[0]["lr"],
                            steps_per_s=progress.rate(step))
                progress.update(step, **shown)
                stopping = stop.should_stop()
                if step % self.checkpoint_every == 0 or step == steps or stopping:
                    if bool(state["bad"]) or not self._finite_loss_at(model, loss_fn, step, name, ckpt):
                        self._diverged(name, step, "the loss or a gradient", ckpt)
                    self._save(ckpt, state, step)
                if stopping:
                    self.print(f"[{name}] stopped at step {step}; checkpoint {ckpt}; continue with --resume")
                    teardown()
                    raise SystemExit(130)
        return self._finish(name, model, history, progress, time.perf_counter() - t0)

    def _finish(self, name: str, model, history: dict, progress: Progress, seconds: float) -> dict:
        for key, value in model.state_dict().items():   # the EMA codebook is updated outside autograd
            if key.endswith("codebook"):
                check_replicas_equal("codebook", value)
        self.print(f"[{name}] {progress.total} steps done in {progress.elapsed():.0f} s")
        self.timings[f"{name}_seconds"] = seconds
        self.histories[name] = history
        return history

    def _step(self, state: dict, loss_fn, ddp, step: int) -> dict:
        """One optimizer step of loss_fn(ddp, step); returns its metrics. A non-finite loss or gradient
        is flagged in state["bad"] before the step; checked at once where that is free (one CPU
        process), elsewhere at the next log or checkpoint step, where the host waits anyway."""
        model, optimizer, scaler, amp = state["model"], state["optimizer"], state["scaler"], state["amp"]
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
            loss, metrics = self._guarded(loss_fn, ddp, step, state["name"], state["ckpt"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if not scaler.is_enabled():   # fp16's scaler skips non-finite steps itself
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            bad = state["bad"] | ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
            # The loss of one process of several is its own; their gradients are all-reduced.
            state["bad"] = bad | ~torch.isfinite(loss.detach()) if self.env.world_size == 1 else bad
            if self.device.type == "cpu" and self.env.world_size == 1 and bool(state["bad"]):
                self._diverged(state["name"], step + 1, "the loss or a gradient", state["ckpt"])
        scaler.step(optimizer)
        scaler.update()
        return metrics

    def _guarded(self, loss_fn, model, step: int, name: str, ckpt: Path):
        """loss_fn(model, step); the quantizer's refusal of NaN/Inf latents, which in training come
        from weights sent off by a too large step, ends the run as a divergence."""
        try:
            return loss_fn(model, step)
        except ValueError as e:
            if "NaN or Inf" not in str(e) and "non-finite" not in str(e):   # vqvae.py's two refusals of them
                raise
            self._diverged(name, step + 1, f"an activation ({e})", ckpt)

    def _finite_loss_at(self, model, loss_fn, step: int, name: str, ckpt: Path) -> bool:
        """Whether the weights about to be saved give a finite loss on the next batch: a forward pass
        in eval mode (the codebook does not move) with the random state put back afterwards, so
        that the run goes on exactly as without it. The same answer on every process."""
        devices = [self.device] if self.device.type == "cuda" else []
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            loss, _ = self._guarded(loss_fn, model, step, name, ckpt)
        model.train()
        finite = torch.isfinite(loss.detach()).float()
        return bool(finite) if not dist.is_initialized() else read_metrics({"finite": finite}, self.device)["finite"] == 1

    def _save(self, ckpt: Path, state: dict, step: int) -> None:
        model = state["model"]
        if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
            self._diverged(state["name"], step, "a weight", ckpt)
        if self.is_main:
            weights = model_state(model) if isinstance(model, MODELS) else {"model": model.state_dict()}
            save_checkpoint(ckpt, {**weights, "optimizer": state["optimizer"].state_dict(),
                                   "rng": torch.get_rng_state(), "history": state["history"], "step": step,
                                   "options": self.options, "resumed": state["resumed"], **state["extra"],
                                   **({"vqvae_id": state["made_for"]} if state["made_for"] else {}),
                                   **({"scaler": state["scaler"].state_dict()} if state["scaler"].is_enabled() else {})})

    def _diverged(self, name: str, step: int, what: str, ckpt: Path):
        saved = f"{ckpt} (step {load_checkpoint(ckpt)['step']})" if ckpt.exists() else "none"
        raise SystemExit(f"[{name}] step {step}: {what} is not finite; stopped without saving. Last good "
                         f"checkpoint: {saved}. Try a lower learning rate (--resume with a lower --lr "
                         "continues from that checkpoint).")

    def _resume(self, name, ckpt, model, optimizer, scaler, made_for):
        """(history, step, resumed) of a model that starts: from its checkpoint with --resume (model,
        optimizer, scaler and random state restored, its options checked), else empty at step 0. A
        checkpoint without --resume is refused, so that no run is overwritten by mistake."""
        if made_for and ckpt.exists():
            _check_made_for(ckpt, load_checkpoint(ckpt), made_for)
        if not ckpt.exists():
            if self.resume:
                self.print(f"[{name}] --resume: no {ckpt} yet; starting from step 0")
            return {"step": []}, 0, []
        if not self.resume:
            raise SystemExit(f"{ckpt} exists: pass --resume to continue it, or another --out")
        state = load_checkpoint(ckpt)
        lowered = self._check_options(ckpt, state.get("options"))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        resumed = state.get("resumed", []) + ([{"step": state["step"], **lowered}] if lowered else [])
        self.print(f"[{name}] resumed at step {state['step']} from {ckpt}"
                   + "".join(f"; {_flag(k)} lowered from {a} to {b}" for k, (a, b) in lowered.items()))
        return state["history"], state["step"], resumed

    def _check_options(self, path: Path, saved: dict | None) -> dict:
        """Refuse to resume a checkpoint trained with other options (except the resumable ones, and
        learning rates lowered, which are returned as {option: (before, now)}), naming each change;
        a learning-rate schedule other than constant also fixes the steps it spans."""
        if saved is None or "world_size" not in saved:
            raise SystemExit(f"--resume: {path} does not record the options, data and processes it was trained "
                             "with (an older version wrote it): train into another --out")
        now = self.options
        fixed = {k for k in saved.keys() | now.keys() if k not in self.resumable}
        scheduled = {steps: schedule for schedule, steps in SCHEDULED_STEPS.items()
                     if now.get(schedule) not in (None, "constant")}
        fixed |= scheduled.keys()
        lowered = {k: (saved[k], now[k]) for k in LOWERABLE if k in fixed and isinstance(saved.get(k), float)
                   and isinstance(now.get(k), float) and now[k] < saved[k]}
        changed = sorted(k for k in fixed - lowered.keys() if saved.get(k) != now.get(k))
        if changed:
            special = {"training_data": lambda a, b: f"other training data (content key {a}, now {b})",
                       "world_size": lambda a, b: f"{a} process(es) (now {b}: another global batch)"}
            listed = ", ".join(special.get(k, lambda a, b: f"{_flag(k)} {a} (now {b})")(saved.get(k), now.get(k))
                               for k in changed)
            why = "".join(f" (the {_flag(scheduled[k])} {now[scheduled[k]]} rates depend on {_flag(k)})"
                          for k in changed if k in scheduled and scheduled[k] not in changed)
            raise SystemExit(f"--resume: {path} was trained with {listed}{why}; resume with those values, or train "
                             "into another --out")
        return lowered

    # ------------------------------------------------------------------------- reading back
    def load(self, name: str, optional: bool = False):
        """The model of <out>/<name>.pt in eval mode on the run's device (None if `optional` and
        absent); its history joins run.histories. Loading "vqvae" sets run.vqvae_id; a model fitted
        to another VQ-VAE's codes (a prior) is refused."""
        path = self.out / f"{name}.pt"
        if optional and not path.exists():
            return None
        model, state = load_model(path, self.device)
        trained_on = (state.get("options") or {}).get("training_data")
        if trained_on and self.options.get("training_data") and trained_on != self.options["training_data"]:
            raise SystemExit(f"{path} was trained on other data (content key {trained_on}, now "
                             f"{self.options['training_data']}): use the data it was trained on, or another --out")
        self.histories[name] = state.get("history")
        if name == "vqvae":
            self.vqvae_id = model_fingerprint(state)
        elif "vqvae_id" in state:
            _check_made_for(path, state, self.vqvae_id)
        return model

    def cached(self, name: str, made_from: dict, make) -> dict:
        """<out>/<name>.pt if it was made from `made_from` (with the run's VQ-VAE and training data),
        else make(), saved there by the main process."""
        made_from = {"vqvae": self.vqvae_id, "training_data": self.options.get("training_data"), **made_from}
        return cached(self.out / f"{name}.pt", made_from, make, save=self.is_main)

    def end_training(self) -> bool:
        """End the process group (the main process evaluates alone); True on the main process."""
        teardown()
        self.eval_t0 = time.perf_counter()
        return self.is_main

    def report(self, metrics: dict, model_config, **extra) -> None:
        """<out>/metrics.json: the metrics, this command's options ("config"), per checkpoint the
        options it was trained with where they differ and how it was resumed, the model config, the
        timings; and <out>/report.md."""
        self.timings["eval_seconds"] = time.perf_counter() - (self.eval_t0 or self.t0)
        self.timings["total_seconds"] = time.perf_counter() - self.t0
        write_json(self.out / "metrics.json", {
            "metrics": metrics, "config": self.options, "checkpoints": self._checkpoint_options(),
            "model_config": dataclasses.asdict(model_config), "timings": self.timings, "torch": torch.__version__,
            "quantizer_backend": quantizer_backend(self.device), "world_size": self.env.world_size,
            "threads": torch.get_num_threads(), **extra})
        write_report_page(self.out, metrics, self.options, self.timings)
        print("test: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))),
              flush=True)
        print(f"wrote {self.out}/metrics.json, report.md and figures", flush=True)

    def _checkpoint_options(self) -> dict:
        """{checkpoint: {"options": those it was trained with that differ from this command's,
        "resumed": its resumptions with a lowered learning rate}} for each checkpoint of a stage."""
        found = {}
        for path in sorted(self.out.glob("*.pt")):
            if ".tmp" in path.name:
                continue
            state = load_checkpoint(path)
            saved = state.get("options")
            if saved is not None:
                found[path.name] = {"options": {k: saved.get(k) for k in sorted(saved.keys() | self.options.keys())
                                                if k not in ("stages", "resume") and saved.get(k) != self.options.get(k)},
                                    "resumed": state.get("resumed", [])}
        return found


def write_report_page(out: Path, metrics: dict, options: dict, timings: dict) -> None:
    """<out>/report.md: one page that explains a run: its metrics as a table, the options that
    matter, the timings, and its figures inline."""
    numbers = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]
    shown = {k: v for k, v in options.items() if k not in ("resume", "out", "stages", "device", "data_dir")}
    lines = [f"# Run `{out}`", "", "| metric | value |", "|---|---|",
             *[f"| {k} | {v if isinstance(v, int) else f'{v:.4g}'} |" for k, v in numbers], "",
             "Options: " + ", ".join(f"`{k}={v}`" for k, v in sorted(shown.items())) + ".", "",
             "Timings: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s" for k, v in timings.items()) + ".", ""]
    for figure in sorted(out.glob("*.png")) + sorted(out.glob("*.gif")):
        lines += [f"## {figure.stem.replace('_', ' ')}", "", f"![{figure.stem}]({figure.name})", ""]
    write_atomically(out / "report.md", lambda tmp: tmp.write_text("\n".join(lines)))


def _check_made_for(path: Path, state: dict, vqvae_id: str | None) -> None:
    """A prior is only valid for the codes of the VQ-VAE it was trained on (model_fingerprint)."""
    made_for = state.get("vqvae_id", "an unrecorded VQ-VAE")
    if made_for != vqvae_id:
        raise SystemExit(f"{path.name} was fitted to the codes of another VQ-VAE ({made_for}), not to the one in "
                         f"vqvae.pt ({vqvae_id}): delete {path.name} to fit a new prior")


def _continue_log(path: Path, step: int) -> None:
    """Keep the lines of a live-metrics log up to `step` (a run resumed from its checkpoint at that
    step would repeat the later ones), or start it empty for a run from step 0."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() and step > 0 else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    write_atomically(path, lambda tmp: tmp.write_text("".join(kept)))


def _record(history: dict, log, step: int, metrics: dict[str, float], **extra: float) -> None:
    """A history point: appended to history, and as one flushed JSON line to log (main process)."""
    history["step"].append(step)
    for k, v in metrics.items():
        history.setdefault(k, []).append(v)
    if log is not None:
        log.write(json.dumps({"step": step, **metrics, **extra}) + "\n")
        log.flush()


def load_run(out: str | Path, device="cpu"):
    """(VQ-VAE, prior or None), both in eval mode, from a run's --out folder, of any of the three
    scripts: how to reuse a trained model. The prior is refused if it was fitted to the codes of
    another VQ-VAE."""
    out = Path(out)
    model, state = load_model(out / "vqvae.pt", device)
    prior = None
    if (out / "prior.pt").exists():
        prior, prior_state = load_model(out / "prior.pt", device)
        _check_made_for(out / "prior.pt", prior_state, model_fingerprint(state))
    return model, prior
