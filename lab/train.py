"""The training loop, on one screen (fit), and what it needs: the learning-rate schedule, Ctrl-C as
a request to stop after a finished step, and the live metrics log.
What keeps the run safe (resume checks, checksums, the non-finite stop) is in lab/guards.py."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import vqvae
from lab import files, guards
from lab.cli import Progress
from lab.runs import Run, check_replicas_equal, read_metrics, teardown

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def fit(run: Run, name: str, model: torch.nn.Module, loss_fn, steps: int, lr: float, schedule: str = "constant",
        made_for: str | None = None, extra: dict | None = None) -> dict:
    """Train `model` with Adam to `steps` steps into <out>/<name>.pt (continued with --resume); returns its
    history. loss_fn(model, step) -> (loss, {metric: 0-dim tensor}) is a function of the step, batch included,
    so that a resumed run repeats the uninterrupted one. Metrics are read back at log steps only; Ctrl-C saves
    the finished step and exits 130. made_for: the VQ-VAE a prior is fitted to; extra: checkpoint entries."""
    path, amp = run.out / f"{name}.pt", AMP_DTYPES[run.amp]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(run.device.type, enabled=amp == torch.float16)   # fp16 only
    step, history, resumed = resume(run, path, model, optimizer, scaler, made_for)
    last_good = "none" if step == 0 else f"{path} (step {step})"
    ddp = DistributedDataParallel(model) if run.world_size > 1 and dist.is_initialized() else model
    bad = torch.zeros((), dtype=torch.bool, device=run.device)   # a non-finite loss or gradient, kept on the device
    progress, shown, first_loss = Progress(name, steps, step, enabled=run.is_main), {}, None
    model.train()
    with StopRequest() as stop, MetricsLog(path.with_suffix(".jsonl"), step, run.is_main) as log:
        run.print(f"[{name}] training to step {steps} from step {step} in "   # said once Ctrl-C is caught
                  f"{'float32 (--amp off)' if amp is None else f'mixed precision ({run.amp})'}")
        while step < steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, schedule, step, steps)
            with torch.autocast(run.device.type, dtype=amp, enabled=amp is not None):
                loss, metrics = forward(loss_fn, ddp, step, name, last_good)
            first_loss = loss.detach() if first_loss is None else first_loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if not scaler.is_enabled():   # fp16's scaler skips non-finite steps itself
                bad = bad | guards.non_finite(loss, model.parameters(), one_process=run.world_size == 1)
                if run.device.type == "cpu" and run.world_size == 1 and bool(bad):   # free to check here
                    raise guards.diverged(name, step + 1, "the loss or a gradient is not finite", last_good)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if step % run.log_every == 0 or step == steps:   # elsewhere the host never waits for the device
                shown = read_metrics({**metrics, "_bad": bad}, run.device)
                if shown.pop("_bad") or not all(map(math.isfinite, shown.values())):
                    raise guards.diverged(name, step, "the loss, a gradient or a metric is not finite", last_good)
                log.record(history, step, shown, lr=optimizer.param_groups[0]["lr"], steps_per_s=progress.rate(step))
            progress.update(step, **shown)
            stopping = stop.should_stop()
            if step % run.checkpoint_every == 0 or step == steps or stopping:
                if bool(bad):
                    raise guards.diverged(name, step, "the loss or a gradient is not finite", last_good)
                # Saved only if good: finite weights whose loss on the next batch is finite and not exploding.
                # That loss is the one place where loss_fn runs twice for a step (next_loss).
                guards.check_good(name, step, *next_loss(run, model, loss_fn, step, first_loss), model, last_good)
                if run.is_main:
                    files.save_checkpoint(path, {
                        **files.model_state(model), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                        "history": history, "step": step, "options": run.options, "resumed": resumed, **(extra or {}),
                        **({"vqvae_id": made_for} if made_for else {}),
                        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})})
                last_good = f"{path} (step {step})"
            if stopping:
                run.print(f"[{name}] stopped at step {step}; checkpoint {path}; continue with --resume")
                teardown()
                raise SystemExit(130)
    check_replicas_equal("codebook", *[v for k, v in model.state_dict().items() if k.endswith("codebook")])
    run.print(f"[{name}] {progress.total} steps done in {progress.elapsed():.0f} s")
    run.timings[f"{name}_seconds"], run.histories[name] = progress.elapsed(), history
    return history


def forward(loss_fn, model, step: int, name: str, last_good: str):
    """loss_fn(model, step); vqvae.py's refusal of non-finite latents (vqvae.NonFiniteError), which
    in training come from weights sent off by a too large step, ends the run as a divergence."""
    try:
        return loss_fn(model, step)
    except vqvae.NonFiniteError as e:
        raise guards.diverged(name, step + 1, f"an activation ({e}) is not finite", last_good) from None


def next_loss(run: Run, model, loss_fn, step: int, first_loss: torch.Tensor) -> tuple[float, float]:
    """(the loss of the weights about to be saved on the next batch, the run's first loss), averaged
    over processes: a forward pass in eval mode (the codebook does not move) with the random state
    put back afterwards, so that the run goes on exactly as without it. A non-finite activation
    gives a NaN loss, which guards.check_good refuses."""
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        try:
            loss = loss_fn(model, step)[0].detach()
        except vqvae.NonFiniteError:
            loss = torch.tensor(math.nan, device=run.device)
    model.train()
    values = read_metrics({"next": loss, "first": first_loss}, run.device)
    return values["next"], values["first"]


def resume(run: Run, path: Path, model, optimizer, scaler, made_for: str | None) -> tuple[int, dict, list]:
    """(step, history, resumed) of a model that starts: from its checkpoint with --resume (model,
    optimizer, scaler and random state restored, its options checked by guards.check_resume), else
    at step 0. A checkpoint without --resume is refused, so that no run is overwritten by mistake."""
    if made_for and path.exists():
        guards.check_made_for(path, files.load_checkpoint(path), made_for)
    if not path.exists():
        if run.resume:
            run.print(f"[{path.stem}] --resume: no {path} yet; starting from step 0")
        return 0, {"step": []}, []
    if not run.resume:
        raise SystemExit(f"{path} exists: pass --resume to continue it, or another --out")
    state = files.load_checkpoint(path)
    lowered = guards.check_resume(path, state.get("options"), run.options, run.resumable)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    resumed = state.get("resumed", []) + ([{"step": state["step"], **lowered}] if lowered else [])
    run.print(f"[{path.stem}] resumed at step {state['step']} from {path}"
              + "".join(f"; {guards.flag(k)} lowered from {a} to {b}" for k, (a, b) in lowered.items()))
    return state["step"], state["history"], resumed


# ----------------------------------------------------------------------------- the learning rate
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


# ----------------------------------------------------------------------------- Ctrl-C, the live log
class StopRequest:
    """Turns Ctrl-C (SIGINT), SIGTERM and SIGHUP (a closed terminal) into a flag the loop checks
    between steps, so that the checkpoint written on the way out is of a finished step. A step that
    has not ended GRACE seconds later (a huge codebook, a slow device) is stopped at once
    (KeyboardInterrupt: lab.runs.run_main ends the program, the last checkpoint kept), and so is
    every step after a second Ctrl-C."""
    GRACE = 5

    def __enter__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._interrupt)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.alarm(self.GRACE)
        print(f"\nstopping after this step (Ctrl-C again, or {self.GRACE} s more of this step, stops at once)",
              file=sys.stderr, flush=True)

    def _interrupt(self, signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        signal.alarm(0)
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def should_stop(self) -> bool:
        """True on every process as soon as any process was asked to stop."""
        if self.requested:
            signal.alarm(0)   # the step ended in time: stop after it, with a checkpoint
        if not dist.is_initialized():
            return self.requested
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


class MetricsLog(contextlib.AbstractContextManager):
    """<out>/<name>.jsonl, one flushed JSON line per history point (main process): the lines up to
    `step` of a resumed run are kept (it would repeat the later ones), a run from step 0 starts it
    empty."""

    def __init__(self, path: Path, step: int, enabled: bool):
        self.file = None
        if enabled:
            lines = path.read_text().splitlines(keepends=True) if path.exists() and step > 0 else []
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            files.write_atomically(path, lambda tmp: tmp.write_text("".join(kept)))
            self.file = open(path, "a")

    def record(self, history: dict, step: int, metrics: dict[str, float], **extra: float) -> None:
        """A history point: appended to history, and as one line to the log."""
        history["step"].append(step)
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)
        if self.file is not None:
            try:
                self.file.write(json.dumps({"step": step, **metrics, **extra}) + "\n")
                self.file.flush()
            except OSError as e:
                raise files.full_disk(Path(self.file.name)) if e.errno in (errno.ENOSPC, errno.EDQUOT) else e from None

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
