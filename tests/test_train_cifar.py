"""train_cifar.py end to end on a small slice of the real CIFAR-10, resume, data errors, torchrun.

The real data is ../shared/data/cifar10/cifar10-jpeg.tar.gz (or $VQVAE_CIFAR10); it is decoded
once per session into a cache that every run here shares through --data-dir.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_cifar
import vqvae
from lab import files, guards, images, runs

from conftest import CIFAR, ROOT
TINY = ["--hidden-channels", "16", "--res-channels", "8", "--num-res-layers", "1", "--embedding-dim", "8", "--num-embeddings", "32",
        "--batch-size", "8", "--prior-channels", "8", "--prior-num-layers", "2", "--prior-batch-size", "8",
        "--max-train-images", "96", "--max-test-images", "40", "--log-every", "1", "--seed", "3",
        "--lr-schedule", "constant"]  # the resume tests lengthen runs, which a cooldown refuses


def run(out, data_dir, *extra):
    args = ["--data", str(CIFAR), "--data-dir", str(data_dir), "--out", str(out), *TINY, *extra]
    train_cifar.main(args)
    return out


@pytest.mark.parametrize("extra", [[], ["--likelihood", "categorical", "--num-groups", "2", "--decay", "none"]],
                         ids=["gaussian-ema", "categorical-grouped"])
def test_all_stages_write_metrics_and_figures(tmp_path, data_dir, extra):
    out = run(tmp_path / "run", data_dir, "--steps", "4", "--prior-steps", "3", *extra)
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert m["num_test_images"] == 40 and 0 < m["test_mse"] < 1 and m["test_psnr_db"] > 0
    assert m["test_nmse"] == pytest.approx(m["test_mse"] / report["data_variance"])
    assert 1 <= m["test_perplexity"] <= m["test_codes_used"] <= 32
    if "categorical" in extra:
        # the uniform prior's bound is log K per latent more than log p(x|z) alone
        assert m["test_bits_per_dim"] > 0 and m["test_bits_per_dim_uniform_prior"] > 0
        assert report["model_config"]["num_groups"] == 2
    for name in ["reconstructions", "codebook_usage", "vqvae_curves", "prior_curves", "prior_samples"]:
        assert (out / f"{name}.png").stat().st_size > 1000
    assert len(files.load_checkpoint(out / "vqvae.pt")["history"]["step"]) == 4


def test_resumed_run_repeats_uninterrupted_losses_step_for_step(tmp_path, data_dir):
    full = run(tmp_path / "full", data_dir, "--steps", "6", "--prior-steps", "4")
    part = tmp_path / "part"
    run(part, data_dir, "--steps", "3", "--stages", "vqvae")
    run(part, data_dir, "--steps", "6", "--prior-steps", "2", "--stages", "vqvae,prior", "--resume")
    run(part, data_dir, "--steps", "6", "--prior-steps", "4", "--resume")
    for name in ["vqvae.pt", "prior.pt"]:
        a, b = files.load_checkpoint(full / name), files.load_checkpoint(part / name)
        assert a["history"] == b["history"] and a["step"] == b["step"]
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key


def test_cosine_schedule_sets_each_steps_learning_rate(tmp_path, data_dir):
    out = run(tmp_path / "cos", data_dir, "--steps", "3", "--stages", "vqvae", "--lr", "1e-3", "--lr-schedule", "cosine")
    # step s of 3 trains at 1e-3 * (1 + cos(pi s / 3)) / 2: 1e-3, 7.5e-4, 2.5e-4
    logged = [json.loads(line)["lr"] for line in (out / "vqvae.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([1e-3, 7.5e-4, 2.5e-4], rel=1e-12)


def test_live_metrics_log_has_one_line_per_history_point_and_resume_continues_it(tmp_path, data_dir):
    out = run(tmp_path / "r", data_dir, "--steps", "4", "--stages", "vqvae")
    lines = [json.loads(line) for line in (out / "vqvae.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert {"loss", "recon_loss", "perplexity", "codes_used", "lr", "steps_per_s"} <= lines[0].keys()
    assert lines[0]["lr"] == 1e-3 and lines[-1]["loss"] == files.load_checkpoint(out / "vqvae.pt")["history"]["loss"][-1]
    with open(out / "vqvae.jsonl", "a") as f:  # a line logged after the last checkpoint, then a crash
        f.write(json.dumps({"step": 5, "stale": True}) + "\n")
    run(out, data_dir, "--steps", "6", "--stages", "vqvae", "--resume")
    lines = [json.loads(line) for line in (out / "vqvae.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6] and not any("stale" in line for line in lines)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_each_precision_trains_with_finite_losses_and_a_float32_quantizer(tmp_path, data_dir, amp, capsys):
    out = run(tmp_path / amp, data_dir, "--steps", "3", "--prior-steps", "2", "--amp", amp, "--stages", "vqvae,prior")
    said = "in float32 (--amp off)" if amp == "off" else f"in mixed precision ({amp})"
    assert capsys.readouterr().out.count(said) == 2  # both stages say which
    for name, keys in (("vqvae.pt", ["loss", "perplexity"]), ("prior.pt", ["prior_loss"])):
        state = files.load_checkpoint(out / name)
        assert all(math.isfinite(v) for k in keys for v in state["history"][k]) and ("scaler" in state) == (amp == "fp16")
    model, _ = runs.load_run(out)
    assert model.quantizer.codebook.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_e = model.encode(images.to_float(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), "cpu"))
        vq = model.quantize(z_e)
    assert z_e.dtype == torch.bfloat16 and vq.commitment_loss.dtype == vq.perplexity.dtype == torch.float32
    flat = z_e.float().movedim(1, -1).reshape(-1, z_e.shape[1])
    assert torch.equal(vq.codes.flatten(), vqvae.nearest_code(flat, model.quantizer.codebook))


def test_existing_checkpoint_without_resume_is_refused(tmp_path, data_dir):
    run(tmp_path / "r", data_dir, "--steps", "2", "--stages", "vqvae")
    with pytest.raises(SystemExit, match="--resume"):
        run(tmp_path / "r", data_dir, "--steps", "2", "--stages", "vqvae")


def test_prior_of_an_earlier_vqvae_is_refused_and_codes_are_recomputed(tmp_path, data_dir):
    out = run(tmp_path / "r", data_dir, "--steps", "2", "--prior-steps", "2", "--stages", "vqvae,prior")
    run(out, data_dir, "--steps", "4", "--stages", "vqvae", "--resume")  # the VQ-VAE trains on
    with pytest.raises(SystemExit, match="delete prior.pt"):
        run(out, data_dir, "--steps", "4", "--prior-steps", "2", "--stages", "prior", "--resume")
    vqvae_id = guards.model_fingerprint(files.load_checkpoint(out / "vqvae.pt"))
    assert vqvae_id.startswith("step 4, sha256 ")
    assert files.load_checkpoint(out / "codes.pt")["made_from"]["vqvae"] == vqvae_id


def test_prior_and_codes_of_another_vqvae_at_the_same_step_are_not_reused(tmp_path, data_dir):
    out = run(tmp_path / "a", data_dir, "--steps", "2", "--prior-steps", "2", "--stages", "vqvae,prior")
    other = run(tmp_path / "b", data_dir, "--steps", "2", "--stages", "vqvae", "--lr", "2e-3")  # same data
    shutil.copy(other / "vqvae.pt", out / "vqvae.pt")  # same step and config, other weights
    with pytest.raises(SystemExit, match=r"prior.pt was fitted to the codes of another VQ-VAE \(step 2, sha256 "):
        run(out, data_dir, "--steps", "2", "--prior-steps", "2", "--stages", "prior", "--resume")
    codes = files.load_checkpoint(out / "codes.pt")
    assert codes["made_from"]["vqvae"] == guards.model_fingerprint(files.load_checkpoint(other / "vqvae.pt"))


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, data_dir):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-u", str(ROOT / "train_cifar.py"), "--data", str(CIFAR), "--data-dir", str(data_dir),
           "--out", str(out), "--stages", "vqvae", "--steps", "100000", *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training runs
        if line.startswith("[vqvae] training"):
            break
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output  # the shell's status for Ctrl-C, after saving
    assert "stopped at step" in output
    state = files.load_checkpoint(out / "vqvae.pt")
    stopped = state["step"]
    assert 0 < stopped < 100000
    run(out, data_dir, "--stages", "vqvae", "--steps", str(stopped + 2), "--resume")
    full = run(tmp_path / "full", data_dir, "--stages", "vqvae", "--steps", str(stopped + 2))
    assert files.load_checkpoint(out / "vqvae.pt")["history"] == files.load_checkpoint(full / "vqvae.pt")["history"]


def test_torchrun_two_processes_keep_one_codebook(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_cifar.py"), "--data", str(CIFAR), "--data-dir", str(data_dir),
           "--out", str(tmp_path / "ddp"), "--steps", "3", "--prior-steps", "2", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "codebook identical on all 2 processes" in result.stdout
    assert json.loads((tmp_path / "ddp/metrics.json").read_text())["world_size"] == 2


def test_two_torchrun_agents_keep_one_codebook_and_resume_it_on_both(tmp_path, data_dir):
    """torchrun --nnodes 2, as on two hosts: two agents meeting at a c10d rendezvous on 127.0.0.1.
    With k-means init and dead-code restarts on, the codebook is identical on both processes after
    training and after a resume; a one-process checkpoint is not resumed with two processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two_nodes"
    options = ["--data", str(CIFAR), "--data-dir", str(data_dir), "--out", str(out), *TINY, "--stages", "vqvae",
               "--kmeans-init", "--dead-code-threshold", "0.5", "--checkpoint-every", "2"]

    def agents(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", str(port),
               str(ROOT / "train_cifar.py"), *options, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for _ in range(2)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
        return "".join(outputs)

    assert "codebook identical on all 2 processes" in agents("--steps", "4")
    before = files.load_checkpoint(out / "vqvae.pt")
    assert before["options"]["world_size"] == 2 and before["model"]["quantizer.initialized"]
    assert "codebook identical on all 2 processes" in agents("--steps", "6", "--resume")
    assert files.load_checkpoint(out / "vqvae.pt")["step"] == 6
    with pytest.raises(SystemExit, match=r"trained with 2 process\(es\) \(now 1: another global batch\)"):
        run(out, data_dir, "--stages", "vqvae", "--kmeans-init", "--dead-code-threshold", "0.5", "--steps", "8",
            "--resume")


def test_batch_larger_than_the_data_is_refused_in_one_line(tmp_path, data_dir):
    with pytest.raises(SystemExit, match=r"batch size 200 x 1 process\(es\) exceeds the 96 training examples"):
        run(tmp_path / "r", data_dir, "--stages", "vqvae", "--steps", "2", "--batch-size", "200")


def test_presets_carry_the_paper_and_sonnet_settings():
    paper = train_cifar.parse_args(["--preset", "paper"])
    assert (paper.hidden_channels, paper.res_channels, paper.lr, paper.batch_size, paper.steps, paper.commitment_cost) == \
        (256, 256, 2e-4, 128, 250_000, 0.25)
    assert (paper.num_embeddings, paper.num_groups, paper.likelihood, paper.decay) == (512, 10, "categorical", None)
    assert paper.dead_code_threshold == 0.1 and not paper.kmeans_init  # the collapse remedy, not in the paper
    sonnet = train_cifar.parse_args(["--preset", "sonnet", "--decay", "none", "--steps", "7"])
    assert (sonnet.hidden_channels, sonnet.res_channels, sonnet.embedding_dim, sonnet.lr, sonnet.batch_size) == (128, 32, 64, 3e-4, 32)
    assert sonnet.decay is None and sonnet.steps == 7  # the command line wins over the preset
    quick = train_cifar.parse_args([])
    assert quick.preset == "quick" and (quick.decay, quick.kmeans_init, quick.dead_code_threshold) == (0.9, True, 0.1)


# ----------------------------------------------------------------------------- your own images
def own_images(root: Path, layout: str, size=(64, 64), classes=12, per_class=3, mode="RGB") -> Path:
    """A generated image folder: "classes" (train/test/<class>/), "flat" (no split, no classes)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            folders = [root / split / f"class_{c:02d}" for split in ("train", "test")] if layout == "classes" else [root]
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).convert(mode).save(folder / f"img_{c}_{i}.png")
    return root


SMALL = ["--hidden-channels", "16", "--res-channels", "8", "--num-res-layers", "1", "--embedding-dim", "8", "--num-embeddings", "32",
         "--batch-size", "4", "--prior-channels", "8", "--prior-num-layers", "2", "--prior-batch-size", "4",
         "--steps", "2", "--prior-steps", "2", "--log-every", "1"]


@pytest.mark.parametrize("layout, extra, image_shape, num_classes", [
    ("classes", [], (3, 64, 64), 12),
    ("flat", [], (3, 64, 64), None),
    ("classes", ["--image-size", "32", "--channels", "1"], (1, 32, 32), 12),
], ids=["64x64-12-classes", "flat-unconditional", "resized-grayscale"])
def test_any_image_folder_trains_every_stage(tmp_path, layout, extra, image_shape, num_classes):
    data = own_images(tmp_path / "images", layout, size=(80, 64) if extra else (64, 64), mode="RGBA")
    out = tmp_path / "run"
    train_cifar.main(["--data", str(data), "--data-dir", str(tmp_path / "cache"), "--out", str(out), *SMALL, *extra])
    model, prior = runs.load_run(out)
    assert model.config.in_channels == image_shape[0] and prior.num_classes == num_classes
    side = image_shape[1] // 4
    assert files.load_checkpoint(out / "codes.pt")["train"].shape[1:] == (side, side)
    report = json.loads((out / "metrics.json").read_text())
    assert 0 < report["metrics"]["test_mse"] and report["metrics"]["prior_test_bits_per_code"] > 0
    assert (out / "prior_samples.png").stat().st_size > 1000


@pytest.mark.parametrize("make, extra, message", [
    (lambda root: own_images(root, "flat", size=(30, 30), classes=2, per_class=5), [],
     r"is 30x30; sides must be multiples of 4 .* pass --image-size N"),
    (lambda root: (own_images(root, "flat", classes=2, per_class=5),
                   own_images(root / "more", "flat", size=(32, 32), classes=1, per_class=1)), [],
     r"is 32x32 but the first image is 64x64; pass --image-size N"),
    (lambda root: own_images(root, "flat", classes=1, per_class=5), [], r"found 5 training and 0 test images"),
    (lambda root: own_images(root, "flat", classes=2, per_class=5), ["--image-size", "30"],
     r"--image-size: expected a multiple of 4; got 30"),
], ids=["odd-size", "mixed-sizes", "too-few", "bad-image-size"])
def test_unusable_image_folder_is_refused_before_training(tmp_path, make, extra, message, capsys):
    make(tmp_path / "images")
    with pytest.raises(SystemExit) as exit_info:
        train_cifar.main(["--data", str(tmp_path / "images"), "--data-dir", str(tmp_path / "cache"),
                          "--out", str(tmp_path / "run"), *SMALL, *extra])
    assert re.search(message, str(exit_info.value) + capsys.readouterr().err)
    assert not (tmp_path / "run" / "vqvae.pt").exists()


def test_first_run_that_decodes_the_images_trains_as_a_later_run_from_the_cache(tmp_path):
    # Decoded images once came out channels-last in memory and cached ones contiguous: the same
    # values, but convolutions on the two layouts round differently, so a fresh machine's first run
    # followed another trajectory than every later run with the same seed.
    data = own_images(tmp_path / "images", "classes", size=(32, 32), classes=2, per_class=6)
    runs = [tmp_path / "first", tmp_path / "cached"]
    for out in runs:
        train_cifar.main(["--data", str(data), "--data-dir", str(tmp_path / "cache"), "--out", str(out), *SMALL,
                          "--steps", "3", "--stages", "vqvae"])
    a, b = (files.load_checkpoint(out / "vqvae.pt") for out in runs)
    assert a["history"] == b["history"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    fresh = images.read_image_folder(data)["train_x"]
    assert fresh.flags["C_CONTIGUOUS"] and fresh.shape[1:] == (3, 32, 32)
