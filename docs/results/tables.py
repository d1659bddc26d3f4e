"""The tables of the results pages, made from the runs behind them: each run's metrics.json (or a
benchmark's JSON) is kept in docs/results/runs/, and each table is written between markers in its
page with the commands that made its rows, so that a page cannot drift from its runs.

    python docs/results/tables.py            # rewrites the tables of cifar10.md, speech.md, video.md

tests/test_results.py checks that the pages hold what this would write, and that each run recorded
the options of its command. A new run: copy its metrics.json to docs/results/runs/<name>/ and add a
row below.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
CIFAR = "--data cifar10-jpeg.tar.gz"        # the JPEG stand-in: see cifar10.md
FSDD = "--data free-spoken-digit-dataset"   # with alignments.tsv: python docs/align_fsdd.py DIR


def report(run: str) -> dict:
    return json.loads((RUNS / run / "metrics.json").read_text())


def metric(key: str, fmt: str = "{:.4f}") -> Callable[[dict], str]:
    return lambda r: fmt.format(r["metrics"][key]) if key in r["metrics"] else ""


def percent(key: str) -> Callable[[dict], str]:
    return lambda r: f"{100 * r['metrics'][key]:.1f}%" if key in r["metrics"] else ""


def minutes(*keys: str) -> Callable[[dict], str]:
    """Minutes of each stage, "a / b / c min" (a stage not run: -)."""
    return lambda r: " / ".join(f"{r['timings'][k] / 60:.1f}" if k in r["timings"] else "-" for k in keys) + " min"


def codes_used(r: dict) -> str:
    return f"{r['metrics']['test_codes_used']} of {r['model_config']['num_embeddings']}"


@dataclass
class Table:
    """Rows (label, command, run folder) and columns (header, cell of a run's report). The commands
    are listed above the table, each with its --out runs/<run>."""
    columns: list[tuple[str, Callable[[dict], str]]]
    rows: list[tuple[str, str, str]]
    first: str = "run"

    def render(self) -> str:
        commands = "\n".join(f"OMP_NUM_THREADS=1 {command} --out runs/{run}" for _, command, run in self.rows)
        head = [self.first, *(c for c, _ in self.columns)]
        lines = ["```bash", commands, "```", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, _, run in self.rows:
            r = report(run)
            lines.append("| " + " | ".join([f"{label} (`runs/{run}`)", *(cell(r) for _, cell in self.columns)]) + " |")
        return "\n".join(lines)


@dataclass
class Measures:
    """One run as (measure, value) rows, its command above."""
    command: str
    run: str
    rows: list[tuple[str, Callable[[dict], str]]]

    def render(self) -> str:
        r = report(self.run)
        lines = ["```bash", f"OMP_NUM_THREADS=1 {self.command} --out runs/{self.run}", "```", "",
                 f"| `runs/{self.run}` | |", "|---|---|"]
        return "\n".join(lines + [f"| {label} | {cell(r)} |" for label, cell in self.rows])


@dataclass
class Copier:
    """benchmarks/copier_check.py's rows (its --json), the mean and each seed of a setting."""
    runs: list[tuple[str, str, str]]   # (label of the vqvae.py, command, JSON file in runs/)

    def render(self) -> str:
        lines = ["```bash", *(f"OMP_NUM_THREADS=1 {command} --json {name}" for _, command, name in self.runs), "```",
                 "", "| vqvae.py | client | setting | test NMSE (per seed) | codes used (per seed) |", "|---|---|---|---|---|"]
        for label, _, name in self.runs:
            rows = json.loads((RUNS / name).read_text())["rows"]
            for client, setting in dict.fromkeys((r["client"], r["setting"]) for r in rows):
                chosen = [r for r in rows if (r["client"], r["setting"]) == (client, setting)]
                nmse, used = [r["test_nmse"] for r in chosen], [r["codes_used"] for r in chosen]
                lines.append(f"| {label} | {client} | {setting} | {statistics.mean(nmse):.3f} "
                             f"({' / '.join(f'{x:.3f}' for x in nmse)}) | {statistics.mean(used):.0f} of "
                             f"{chosen[0]['of']} ({' / '.join(map(str, used))}) |")
        return "\n".join(lines)


@dataclass
class Paper:
    """README's "How close to the paper": the paper's number beside this project's, from the runs."""

    def render(self) -> str:
        sonnet, categorical, speech, video = (report(r) for r in ("cifar_sonnet", "cifar_categorical", "speech_quick",
                                                                  "video_quick"))
        pct = lambda r, k: f"{100 * r['metrics'][k]:.1f}%"  # noqa: E731
        rows = [
            ("[CIFAR-10 reconstruction](docs/results/cifar10.md)", "NMSE 0.056 (the authors' Sonnet example, its "
             "last training batches)", f"test NMSE {sonnet['metrics']['test_nmse']:.3f}",
             "Sonnet's exact model and 10k steps (`--preset sonnet`), on JPEG-decoded images"),
            ("[CIFAR-10 bits/dim](docs/results/cifar10.md#bitsdim-the-categorical-decoder)", "4.67",
             f"{categorical['metrics']['test_bits_per_dim']:.2f}",
             "2k steps instead of 250k, on JPEG-decoded images: not comparable"),
            ("[Speech: phones read off the codes](docs/results/speech.md)", "49.3% (VCTK, a K = 128 model at 25 Hz)",
             f"{pct(speech, 'phone_accuracy')} (spoken digits, K = 512 at 125 Hz)",
             f"another experiment: {speech['metrics']['phone_accuracy'] / speech['metrics']['phone_accuracy_random_encoder']:.1f}x "
             "a random encoder here"),
            ("[Speech: speaker conversion](docs/results/speech.md)", "audio samples",
             f"heard as the target speaker {pct(speech, 'conversion_target_speaker_rate')}, digit kept "
             f"{pct(speech, 'conversion_digit_kept_rate')}",
             f"a WaveNet trained for {speech['timings']['vqvae_seconds'] / 60:.0f} minutes on a CPU"),
            ("[Video generated in latent space](docs/results/video.md)", "DeepMind Lab, qualitative",
             f"an action classifier names the commanded action in {pct(video, 'action_accuracy_true_actions')} of "
             "generated steps", "ViZDoom, one run; guidance toward the action (not in the paper)"),
        ]
        return "\n".join(["| experiment | paper | here | note |", "|---|---|---|---|",
                          *(f"| {' | '.join(row)} |" for row in rows)])


@dataclass
class BitsPerDim:
    """TUTORIAL section 10: the bound of the categorical run, term by term, per dimension."""
    run: str = "cifar_categorical"

    def render(self) -> str:
        r = report(self.run)
        m, k, groups = r["metrics"], r["model_config"]["num_embeddings"], r["model_config"]["num_groups"]
        dims, latents = 32 * 32 * 3, (32 // 4) ** 2 * groups   # 4x downsampling, `groups` codes per position
        codes_uniform = latents * math.log2(k) / dims
        reconstruction = m["test_bits_per_dim_uniform_prior"] - codes_uniform
        codes_prior = m["test_bits_per_dim"] - reconstruction
        return "\n".join([
            "```bash", f"OMP_NUM_THREADS=1 {TABLES['cifar10.md']['categorical'].rows[0][1]} --out runs/{self.run}", "```",
            "", "| bits per dimension of a test image (`runs/cifar_categorical`) | |", "|---|---|",
            f"| -log2 p(x \\| z_q) / {dims:,}: the pixels given the codes | {reconstruction:.2f} |",
            f"| the {latents} codes under the uniform prior: {latents} x log2 {k} / {dims:,} | {codes_uniform:.3f} |",
            f"| **bound with the uniform prior** (`test_bits_per_dim_uniform_prior`) | {m['test_bits_per_dim_uniform_prior']:.2f} |",
            f"| the codes under the trained prior: ({latents} x {m['prior_test_bits_per_code']:.2f} + log2 10) / {dims:,} "
            f"| {codes_prior:.3f} |",
            f"| **bound with the prior** (`test_bits_per_dim`) | {m['test_bits_per_dim']:.2f} |"])


@dataclass
class Seen:
    """README: the last lines the quick preset prints, from its run (the format of lab.runs.Run.report)."""
    run: str = "cifar_quick"

    def render(self) -> str:
        m = report(self.run)["metrics"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
        return "\n".join(["```", f"test: {shown}", f"wrote runs/{self.run}/metrics.json, report.md and figures", "```"])


IMAGE = [("test NMSE", metric("test_nmse")), ("PSNR", metric("test_psnr_db", "{:.1f} dB")),
         ("test perplexity", metric("test_perplexity", "{:.0f}")), ("codes used", codes_used)]
COLLAPSE = "python train_cifar.py " + CIFAR + " --stages vqvae,eval --decay 0.99 --lr-schedule constant"
TABLES = {
    "cifar10.md": {
        "seeds": Table(IMAGE, [
            ("seed 0, the whole pipeline", f"python train_cifar.py {CIFAR}", "cifar_quick"),
            ("seed 1, VQ-VAE stage", f"python train_cifar.py {CIFAR} --stages vqvae,eval --seed 1", "cifar_quick_seed1"),
            ("seed 2, VQ-VAE stage", f"python train_cifar.py {CIFAR} --stages vqvae,eval --seed 2", "cifar_quick_seed2")],
            first="quick preset"),
        "presets": Table(IMAGE + [("prior, test bits per code", metric("prior_test_bits_per_code", "{:.2f}")),
                                  ("VQ-VAE / prior time", minutes("vqvae_seconds", "prior_seconds"))], [
            ("the quick preset (the default)", f"python train_cifar.py {CIFAR}", "cifar_quick"),
            ("the sonnet preset: Sonnet's model, 10k steps", f"python train_cifar.py --preset sonnet {CIFAR}",
             "cifar_sonnet"),
            ("Sonnet's model with the quick recipe", f"python train_cifar.py --preset sonnet {CIFAR} --lr 1e-3 "
             "--decay 0.9 --kmeans-init --dead-code-threshold 0.1 --lr-schedule cooldown --stages vqvae,eval",
             "cifar_sonnet_recipe")]),
        "copier": Copier([
            ("this one", f"python benchmarks/copier_check.py {CIFAR} --settings paper paper-exact kmeans codebook-loss "
             "--seeds 0 1 2", "copier_new.json"),
            ("this one", f"python benchmarks/copier_check.py {CIFAR} --settings codebook-loss-exact --seeds 0 1 2",
             "copier_new_exact.json"),
            ("before (cf95d48)", f"python benchmarks/copier_check.py --vqvae old_vqvae.py {CIFAR} --settings paper "
             "codebook-loss --seeds 0 1 2", "copier_old.json")]),
        "collapse": Table(IMAGE, [
            ("codebook loss, no remedy", f"{COLLAPSE} --decay none --no-kmeans-init --dead-code-threshold none",
             "ablation_loss_none"),
            ("codebook loss, dead-code restart", f"{COLLAPSE} --decay none --no-kmeans-init", "ablation_loss_restart"),
            ("EMA, no remedy", f"{COLLAPSE} --no-kmeans-init --dead-code-threshold none", "ablation_ema_none"),
            ("EMA, k-means init", f"{COLLAPSE} --dead-code-threshold none", "ablation_ema_kmeans"),
            ("EMA, dead-code restart", f"{COLLAPSE} --no-kmeans-init", "ablation_ema_restart"),
            ("EMA, both", COLLAPSE, "ablation_ema_both")], first="quick preset, decay 0.99, constant rate"),
        "ingredients": Table(IMAGE, [
            ("the default", f"python train_cifar.py {CIFAR}", "cifar_quick"),
            ("without the cool-down", f"python train_cifar.py {CIFAR} --stages vqvae,eval --lr-schedule constant",
             "ingredient_constant"),
            ("without k-means init", f"python train_cifar.py {CIFAR} --stages vqvae,eval --no-kmeans-init",
             "ingredient_no_kmeans"),
            ("without the dead-code restart", f"python train_cifar.py {CIFAR} --stages vqvae,eval "
             "--dead-code-threshold none", "ingredient_no_restart"),
            ("the paper's EMA decay 0.99", f"python train_cifar.py {CIFAR} --stages vqvae,eval --decay 0.99",
             "ingredient_decay_099")], first="quick preset"),
        "categorical": Table([
            ("bits/dim, uniform prior", metric("test_bits_per_dim_uniform_prior", "{:.2f}")),
            ("bits/dim, its prior", metric("test_bits_per_dim", "{:.2f}")),
            ("prior, test bits per code", metric("prior_test_bits_per_code", "{:.2f}")),
            ("test NMSE", metric("test_nmse", "{:.3f}")), ("codes used", codes_used),
            ("VQ-VAE / prior time", minutes("vqvae_seconds", "prior_seconds"))], [
            ("8x8x10 latents, 256-way categorical decoder", f"python train_cifar.py {CIFAR} --likelihood categorical "
             "--num-groups 10 --decay 0.99 --lr-schedule constant", "cifar_categorical")]),
    },
    "speech.md": {
        "quick": Measures(f"python train_vctk.py {FSDD}", "speech_quick", [
            ("converted clips heard as the target speaker (chance 1 in 6)", percent("conversion_target_speaker_rate")),
            ("digit kept in converted clips", percent("conversion_digit_kept_rate")),
            ("digit recognised in reconstructions", percent("reconstruction_digit_accuracy")),
            ("digit / speaker recognised in real test clips", lambda r: f"{percent('real_test_digit_accuracy')(r)} / "
                                                                      f"{percent('real_test_speaker_accuracy')(r)}"),
            ("phone probe, test frame accuracy (paper: 49.3% on VCTK, another model)", percent("phone_accuracy")),
            ("the same probe, randomly initialised encoder", percent("phone_accuracy_random_encoder")),
            ("the same probe, random encoder with a k-means codebook", percent("phone_accuracy_random_encoder_kmeans")),
            ("majority phone (the paper's \"most likely phoneme\" baseline: 7.2% on VCTK)",
             percent("phone_majority_accuracy")),
            ("prior, test bits per code", metric("prior_test_bits_per_code", "{:.2f}")),
            ("the codes' unigram frequencies, test bits per code", metric("unigram_test_bits_per_code", "{:.2f}")),
            ("prior samples heard as the speaker they were drawn for", percent("prior_sample_speaker_rate")),
            ("codes used by the test clips: perplexity", metric("test_perplexity", "{:.0f}")),
            ("VQ-VAE / classifiers / prior / eval time",
             minutes("vqvae_seconds", "classifiers_seconds", "prior_seconds", "eval_seconds"))]),
    },
    "../../README.md": {"seen": Seen(), "paper": Paper()},
    "../../TUTORIAL.md": {"bits": BitsPerDim(), "quick": Table([
        ("test NMSE", metric("test_nmse", "{:.3f}")), ("codes used", codes_used),
        ("prior, test bits per code (uniform: 9)", metric("prior_test_bits_per_code", "{:.2f}"))], [
        ("the quick preset", f"python train_cifar.py {CIFAR}", "cifar_quick"),
        ("the sonnet preset", f"python train_cifar.py --preset sonnet {CIFAR}", "cifar_sonnet")])},
    "video.md": {
        "quick": Measures("python train_video.py", "video_quick", [
            ("action classifier on real held-out transitions", percent("action_accuracy_real_test")),
            ("... on the VQ-VAE's reconstructions of the replayed truth", percent("action_accuracy_vqvae_reconstruction")),
            ("generated with the true actions, named as commanded", percent("action_accuracy_true_actions")),
            ("generated with shuffled actions, named as the actions given", percent("action_accuracy_shuffled_actions")),
            ("`turn_right` x 10, generated, named `turn_right`", percent("action_accuracy_turn_right_true_actions")),
            ("pixel MSE, first draw, true / shuffled actions", lambda r: f"{r['metrics']['mse_true_actions']:.4f} / "
                                                                         f"{r['metrics']['mse_shuffled_actions']:.4f}"),
            ("pixel MSE, mean of the draws, true / shuffled actions",
             lambda r: f"{r['metrics']['mse_mean_of_draws_true_actions']:.4f} / "
                       f"{r['metrics']['mse_mean_of_draws_shuffled_actions']:.4f}"),
            ("pixel MSE, copying the last real frame", metric("mse_copy_last_frame")),
            ("codes equal to the truth's: generated (true actions) / the last real frame's",
             lambda r: f"{percent('code_accuracy_true_actions')(r)} / {percent('code_accuracy_copy_last_frame')(r)}"),
            ("held-out nats per code, true / shuffled actions (no sampling)",
             lambda r: f"{r['metrics']['prior_test_nats_per_code']:.3f} / "
                       f"{r['metrics']['prior_test_nats_per_code_shuffled_actions']:.3f}"),
            ("frame VQ-VAE: test NMSE, codes used", lambda r: f"{r['metrics']['test_nmse']:.3f}, {codes_used(r)}"),
            ("collect / VQ-VAE / prior / action classifier / eval time",
             minutes("collect_seconds", "vqvae_seconds", "prior_seconds", "action_classifier_seconds", "eval_seconds"))]),
        "guidance": Table([
            ("generated with the true actions, named as commanded", percent("action_accuracy_true_actions")),
            ("with shuffled actions, named as the actions given", percent("action_accuracy_shuffled_actions")),
            ("pixel MSE, first draw / mean of the draws (true actions)",
             lambda r: f"{r['metrics']['mse_true_actions']:.4f} / {r['metrics']['mse_mean_of_draws_true_actions']:.4f}"),
            ("codes equal to the truth's", percent("code_accuracy_true_actions")),
            ("eval time", minutes("eval_seconds"))], [
            ("guidance w = 0.5 (the default)", "python train_video.py", "video_quick"),
            ("plain sampling, w = 0", "python train_video.py --stages eval --resume --guidance 0", "video_quick_w0")],
            first="the same VQ-VAE, prior and classifier"),
    },
}


def block(name: str, text: str) -> str:
    return (f"<!-- table {name}: written by docs/results/tables.py from docs/results/runs/; do not edit -->\n"
            f"{text}\n<!-- end table {name} -->")


BLOCK = re.compile(r"<!-- table (\w+):.*?-->\n.*?<!-- end table \1 -->", re.S)


def rewrite(page: Path, tables: dict) -> str:
    """The page with each of its table blocks written anew (a block the page lacks is an error)."""
    text, found = page.read_text(), set()

    def write(match):
        found.add(match.group(1))
        return block(match.group(1), tables[match.group(1)].render())
    text = BLOCK.sub(write, text)
    if found != set(tables):
        raise SystemExit(f"{page}: table blocks {sorted(found)}, expected {sorted(tables)}")
    return text


def main() -> None:
    for page, tables in TABLES.items():
        path = HERE / page
        path.write_text(rewrite(path, tables))
        print(f"{path}: {len(tables)} tables written", file=sys.stderr)


if __name__ == "__main__":
    main()
