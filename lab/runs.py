"""A run: one command of a script. Its processes and device (torchrun's variables, DDP), its locked
--out folder, its options (recorded in every checkpoint and in metrics.json, compared on --resume),
the models and caches it reads back, and its report (metrics.json, report.md).

A script makes one Run (Run.start), trains with lab.train.fit, reads models back with run.load,
calls run.end_training before it evaluates and run.report at the end. load_run gives a finished
run's models back."""
from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from lab import files, guards

try:
    import vqvae_ext
    WHY_NOT_EXTENSION = None
except ImportError as missing:   # its message says why, and how to build it
    vqvae_ext, WHY_NOT_EXTENSION = None, str(missing)


# ----------------------------------------------------------------------------- processes
def parse_device(text: str) -> torch.device:
    """--device (or a device argument): auto (CUDA when present), cpu, cuda or cuda:N; refused in one
    line otherwise, and cuda where no GPU is visible."""
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


def setup(seed: int, device: str = "auto") -> tuple[torch.device, int, int]:
    """(device, rank, world size): torch.distributed from torchrun's variables, and seeds. Every
    process gets the same seed, so that models start identical; data are sharded by rank."""
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
    return device, rank, world_size


def teardown() -> None:
    """End the process group, every process together (they meet at a barrier first)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


INTERRUPTED = "stopped (Ctrl-C, SIGTERM or SIGHUP): the checkpoints written so far are kept; continue with --resume"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main(). SIGTERM and SIGHUP (a closed terminal) stop it as Ctrl-C does: outside a
    training loop, or in a step that does not end soon after (lab.train.StopRequest), at once, with
    one line and status 130, the lock freed and the checkpoints kept. Under torchrun the process then
    ends as multiprocessing's children do: the atexit handlers, a flush, and os._exit with main's
    status. Why: DDP leaves references to the gloo process group behind, and a worker thread that
    releases the last collective's tensors after Python has begun to finalize aborts the process
    ("terminate called without an active exception"); os._exit never finalizes.
    tests/stress_distributed_exit.py checks the exits."""
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupt)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        try:
            return main()
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr, flush=True)
            raise SystemExit(130) from None
    try:
        main()
        status = 0
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        status = 130
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


def check_replicas_equal(name: str, *tensors: torch.Tensor) -> None:
    """Raise unless each tensor is bitwise the same on every process (e.g. the EMA codebook, updated
    outside autograd)."""
    if not dist.is_initialized():
        return
    for x in tensors:
        gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, x.detach().contiguous())
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"{name} differs between processes")
        if dist.get_rank() == 0:
            print(f"{name} identical on all {len(gathered)} processes", flush=True)


def quantizer_backend(device) -> str:
    """What runs the quantizer's nearest-code search on `device`: "extension: CPU", "extension: CUDA
    sm_XY" or "PyTorch", then why not the extension and how to build it (vqvae_ext.describe, which
    warns once where the extension cannot run)."""
    if vqvae_ext is None:
        return f"PyTorch ({WHY_NOT_EXTENSION})"
    backend = vqvae_ext.describe(device)
    why = vqvae_ext.build_info()["why"]
    if backend == "PyTorch" and torch.device(device).type == "cuda" and why:
        return f"PyTorch (vqvae_ext: {why}; to rebuild it: {vqvae_ext.FIX})"
    return backend


# ----------------------------------------------------------------------------- the run
@dataclass
class Run:
    """One command of a script: where it writes, its options, its processes and device, and what its
    stages left behind (histories, timings, the VQ-VAE's fingerprint)."""
    out: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1
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
        """A script's first steps: --out and --data-dir checked to lie outside --data, --out locked, then
        processes, device and seed (before any data is read)."""
        for option in ("out", "data_dir"):
            if hasattr(args, option):
                guards.check_outside(getattr(args, option), guards.flag(option), getattr(args, "data", None))
        guards.lock_out(args.out)
        options = {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                   for k, v in vars(args).items() if k != "resumable"}
        device, rank, world_size = setup(args.seed, args.device)
        options["world_size"] = world_size   # a resume with another world size changes the batch
        run = cls(args.out, device, rank, world_size, args.resume, args.log_every, args.checkpoint_every, args.amp,
                  options, set(getattr(args, "resumable", ())))
        run.print(run.describe())   # the first line: where the run computes, before any data is read
        return run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """"device cpu x 1; quantizer extension: CPU; out runs/cifar_quick": where the run computes."""
        return f"device {self.device} x {self.world_size}; quantizer {quantizer_backend(self.device)}; out {self.out}"

    def print(self, *text) -> None:
        """print on the main process only, flushed."""
        if self.is_main:
            print(*text, flush=True)

    def use_data(self, *arrays) -> None:
        """Record the training data's content key (checkpoints, caches): a resume on other data, or a
        cache made from other data, is refused or remade."""
        self.options["training_data"] = guards.content_key(*arrays)

    def alone(self) -> "Run":
        """This run on this process alone, as after end_training (the process group is gone): a model
        it trains sees every example, and its timings join this run's."""
        return dataclasses.replace(self, rank=0, world_size=1)

    def batch(self, step: int, dataset_size: int, batch_size: int, seed: int) -> torch.Tensor:
        """Indices of this process's batch at `step`: a seeded permutation per epoch, sharded by
        rank. A pure function of the step, so that a resumed run sees exactly the same batches."""
        per_epoch = dataset_size // (batch_size * self.world_size)
        if per_epoch == 0:
            raise SystemExit(f"batch size {batch_size} x {self.world_size} process(es) exceeds the "
                             f"{dataset_size} training examples: choose a smaller batch")
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        start = (i * self.world_size + self.rank) * batch_size
        return perm[start:start + batch_size]

    def load(self, name: str, optional: bool = False):
        """The model of <out>/<name>.pt in eval mode on the run's device (None if `optional` and
        absent); its history joins run.histories. Loading "vqvae" sets run.vqvae_id; a model fitted
        to another VQ-VAE's codes (a prior), or trained on other data, is refused."""
        path = self.out / f"{name}.pt"
        if optional and not path.exists():
            return None
        model, state = files.load_model(path, self.device)
        guards.check_data(path, (state.get("options") or {}).get("training_data"), self.options.get("training_data"))
        self.histories[name] = state.get("history")
        if name == "vqvae":
            self.vqvae_id = guards.model_fingerprint(state)
        elif "vqvae_id" in state:
            guards.check_made_for(path, state, self.vqvae_id)
        return model

    def cached(self, name: str, made_from: dict, make) -> dict:
        """<out>/<name>.pt if it was made from `made_from` (with the run's VQ-VAE and training data),
        else make(), saved there by the main process."""
        made_from = {"vqvae": self.vqvae_id, "training_data": self.options.get("training_data"), **made_from}
        return files.cached(self.out / f"{name}.pt", made_from, make, save=self.is_main)

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
        files.write_json(self.out / "metrics.json", {
            "metrics": metrics, "config": self.options, "checkpoints": self._checkpoint_options(),
            "model_config": dataclasses.asdict(model_config), "timings": self.timings, "torch": torch.__version__,
            "quantizer_backend": quantizer_backend(self.device), "world_size": self.world_size,
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
            state = files.load_checkpoint(path)
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
    files.write_atomically(out / "report.md", lambda tmp: tmp.write_text("\n".join(lines)))


def load_run(out: str | Path, device="cpu"):
    """(VQ-VAE, prior or None), both in eval mode, from a run's --out folder, of any of the three
    scripts: how to reuse a trained model. The prior is refused if it was fitted to the codes of
    another VQ-VAE."""
    out, device = Path(out), parse_device(str(device))
    model, state = files.load_model(out / "vqvae.pt", device)
    prior = None
    if (out / "prior.pt").exists():
        prior, prior_state = files.load_model(out / "prior.pt", device)
        guards.check_made_for(out / "prior.pt", prior_state, guards.model_fingerprint(state))
    return model, prior
