"""The command line the scripts share: presets that set defaults, the options every run has, the
options named after the model configs, range checks as argparse types, and the progress line of
long work. It knows no script's own flags: a script names the options that a resumed run may
change (`may_change_on_resume`)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

AMP = ("off", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "cooldown")


def checked(kind=int, at_least=None, above=None, below=None, hint: str = ""):
    """An argparse type: `kind` (int or float), finite, >= at_least or > above (and < below); the
    refusal names what was expected and what was given ("expected an integer >= 1; got 0"), then
    the hint of an out-of-range value."""
    what = "an integer" if kind is int else "a finite number"
    bound = f" >= {at_least}" if at_least is not None else f" > {above}" if above is not None else ""
    bound += f" and < {below}" if below is not None else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}{bound}; got {text!r}") from None
        if (not math.isfinite(value) or (at_least is not None and value < at_least)
                or (above is not None and value <= above) or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"expected {what}{bound}{hint}; got {value}")
        return value
    parse.__name__ = kind.__name__
    return parse


def optional(kind):
    """An argparse type: `kind`, or 'none' for None (an option that can be switched off)."""
    def parse(text: str):
        return None if text == "none" else kind(text)
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def decay(text: str) -> float | None:
    """--decay: the EMA codebook's gamma in (0, 1), or 'none' for the codebook loss (gamma 0 would
    replace the codebook by each batch's means)."""
    if text == "none":
        return None
    value = checked(float)(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), or 'none' for the codebook loss; got {value}")
    return value


COUNT, SIZE = checked(int, at_least=1), checked(int, at_least=0)
STEPS = checked(int, at_least=1, hint=" (leave a stage out of --stages to skip it)")
POSITIVE, NON_NEGATIVE = checked(float, above=0), checked(float, at_least=0)


class Parser(argparse.ArgumentParser):
    """argparse with presets. `Parser(doc, presets, name="cifar", stages="vqvae,prior,eval")` adds
    --preset and the run options (--out, --stages, --resume, --seed, --device, --log-every,
    --checkpoint-every, --amp); the add_*_options methods add the options named after the model
    configs; parse() applies the chosen preset, then the command line."""

    def __init__(self, doc: str, presets: dict, name: str, stages: str, log_every: int = 100,
                 checkpoint_every: int = 1000):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.presets, self.name, self.resumable = presets, name, {"stages", "resume", "out", "device", "log_every",
                                                                  "checkpoint_every", "steps", "prior_steps"}
        self.add_argument("--preset", choices=presets, default=next(iter(presets)),
                          help="settings for the options below marked [...]; any option given wins")
        self.add_argument("--out", type=Path, default=None, help=f"output folder (default runs/{name}_<preset>)")
        self.add_argument("--stages", default=stages, help=f"comma-separated subset of {stages}")
        self.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
        self.add_argument("--seed", type=checked(int, at_least=0, below=2 ** 32), default=0,
                          help="seeds the weights, the batches, the data subsets and the sampling")
        self.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
        self.add_argument("--log-every", type=COUNT, default=log_every, help="steps between history points")
        self.add_argument("--checkpoint-every", type=COUNT, default=checkpoint_every, help="steps between checkpoints")
        self.add_argument("--amp", choices=AMP, default="off",
                          help="mixed precision of the training steps (autocast; fp16 with a gradient scaler); "
                               "the quantizer always runs in float32")

    def may_change_on_resume(self, *names: str) -> None:
        """Options (dest names) that a resumed run may change: how far to train, what to evaluate.
        Any other change is refused on --resume, since it would silently mix two runs."""
        self.resumable |= set(names)

    def add_encoder_options(self, g, what: str = "encoder and decoder") -> None:
        g.add_argument("--hidden-channels", type=COUNT, help=f"hidden units of the {what}")
        g.add_argument("--res-channels", type=COUNT, help="hidden units inside the residual blocks")
        g.add_argument("--num-res-layers", type=SIZE, help="residual blocks")

    def add_codebook_options(self, g) -> None:
        g.add_argument("--embedding-dim", type=COUNT, help="D")
        g.add_argument("--num-embeddings", type=COUNT, help="K")
        g.add_argument("--decay", type=decay, help="EMA decay of the codebook (App. A.1), or 'none' for the codebook loss")
        g.add_argument("--commitment-cost", type=NON_NEGATIVE, help="beta of Eq. 3")
        g.add_argument("--kmeans-init", action=argparse.BooleanOptionalAction, default=False,
                       help="codebook from k-means on the first batch (not in the paper)")
        g.add_argument("--dead-code-threshold", type=optional(POSITIVE),
                       help="restart codes whose moving-average use per batch falls below it, or 'none' (not in the paper)")

    def add_optimizer_options(self, g, batch_help: str = "per process") -> None:
        g.add_argument("--lr", type=POSITIVE, help="Adam's learning rate")
        g.add_argument("--batch-size", type=COUNT, help=batch_help)
        g.add_argument("--steps", type=STEPS, help="training steps")
        g.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                       help="constant: --lr throughout; cosine: from --lr down to 0 over --steps; cooldown: "
                            "--lr, then linearly down to 0 over the last 20%% of --steps")

    def add_prior_options(self, g, schedule: bool = False) -> None:
        g.add_argument("--prior-channels", type=COUNT, help="channels of the prior's layers")
        g.add_argument("--prior-num-layers", type=COUNT, help="layers of the prior")
        g.add_argument("--prior-lr", type=POSITIVE, help="Adam's learning rate")
        g.add_argument("--prior-batch-size", type=COUNT, help="per process")
        g.add_argument("--prior-steps", type=STEPS, help="training steps")
        if schedule:
            g.add_argument("--prior-lr-schedule", choices=LR_SCHEDULES, help="as --lr-schedule, over --prior-steps")

    def parse(self, argv=None) -> argparse.Namespace:
        """The options: the preset's values as defaults, then the command line. --help lists each
        preset's value of an option; --stages is checked; --out defaults to runs/<name>_<preset>."""
        for action in self._actions:
            if any(action.dest in preset for preset in self.presets.values()):
                values = ", ".join(f"{name} {_shown(preset.get(action.dest, action.default))}"
                                   for name, preset in self.presets.items())
                action.help = f"{action.help or ''} [{values}]".lstrip()
        self.set_defaults(**self.presets[self.parse_known_args(argv)[0].preset])
        args = self.parse_args(argv)
        args.out = args.out or Path("runs") / f"{self.name}_{args.preset}"
        args.experiment = self.name   # recorded with the options: --resume of another script's folder is refused
        valid = self.get_default("stages").split(",")
        args.stages = set(args.stages.split(","))
        if not args.stages <= set(valid):
            self.error(f"--stages: expected a subset of {','.join(valid)}; got {','.join(sorted(args.stages))}")
        args.resumable = sorted(self.resumable)
        return args


def _shown(value) -> str:
    return "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else str(value)


def config(config_class, args, prefix: str = "", **values):
    """config_class from the options named after its fields (--<prefix><field>), then `values`."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    given = {name: getattr(args, prefix + name) for name in fields if hasattr(args, prefix + name)}
    return config_class(**{**given, **values})


# ----------------------------------------------------------------------------- the progress line
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
