"""Bad input and faults, one table each: every case is refused with one line naming the option,
file or argument, what was expected and what was given, before any training step runs; or, for
the faults, handled without losing a result."""
import json
import math
import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import train_cifar
import train_vctk
import train_video
import vqvae
from conftest import CIFAR
from lab import files, guards, images, runs, speech

SCRIPTS = {"cifar": train_cifar, "vctk": train_vctk, "video": train_video}

# ------------------------------------------------------------------ command line, at parse time
OPTION_CASES = [
    ("cifar", ["--steps", "0"], r"--steps: expected an integer >= 1 \(leave a stage out of --stages to skip it\); got 0"),
    ("cifar", ["--prior-steps", "0"], r"--prior-steps: expected an integer >= 1 .*got 0"),
    ("cifar", ["--batch-size", "-3"], r"--batch-size: expected an integer >= 1; got -3"),
    ("cifar", ["--prior-batch-size", "0"], r"--prior-batch-size: expected an integer >= 1; got 0"),
    ("cifar", ["--log-every", "0"], r"--log-every: expected an integer >= 1; got 0"),
    ("cifar", ["--checkpoint-every", "0"], r"--checkpoint-every: expected an integer >= 1; got 0"),
    ("cifar", ["--num-embeddings", "0"], r"--num-embeddings: expected an integer >= 1; got 0"),
    ("cifar", ["--max-train-images", "0"], r"--max-train-images: expected an integer >= 1; got 0"),
    ("cifar", ["--num-res-layers", "-1"], r"--num-res-layers: expected an integer >= 0; got -1"),
    ("cifar", ["--lr", "0"], r"--lr: expected a finite number > 0; got 0.0"),
    ("cifar", ["--lr", "nan"], r"--lr: expected a finite number > 0; got nan"),
    ("cifar", ["--prior-lr=-1e-3"], r"--prior-lr: expected a finite number > 0; got -0.001"),
    ("cifar", ["--commitment-cost", "-0.25"], r"--commitment-cost: expected a finite number >= 0; got -0.25"),
    ("cifar", ["--decay", "0"], r"--decay: expected a number in \(0, 1\), or 'none' for the codebook loss; got 0.0"),
    ("cifar", ["--decay", "1"], r"--decay: expected a number in \(0, 1\), or 'none' for the codebook loss; got 1.0"),
    ("cifar", ["--dead-code-threshold", "0"], r"--dead-code-threshold: expected a finite number > 0; got 0.0"),
    ("cifar", ["--stages", "vqvae,fit"], r"--stages: expected a subset of vqvae,prior,eval; got fit,vqvae"),
    ("vctk", ["--temperature", "0"], r"--temperature: expected a finite number > 0; got 0.0"),
    ("vctk", ["--temperature", "-1"], r"--temperature: expected a finite number > 0; got -1.0"),
    ("vctk", ["--crop", "0"], r"--crop: expected an integer >= 1; got 0"),
    ("vctk", ["--clip-seconds", "0"], r"--clip-seconds: expected a finite number > 0; got 0.0"),
    ("vctk", ["--classifier-steps", "0"], r"--classifier-steps: expected an integer >= 1 \(leave a stage out of "
                                          r"--stages to skip it\); got 0"),
    ("video", ["--action-classifier-steps", "0"], r"--action-classifier-steps: expected an integer >= 1 \(leave a "
                                                  r"stage out of --stages to skip it\); got 0"),
    ("vctk", ["--eval-clips", "0"], r"--eval-clips: expected an integer >= 1; got 0"),
    ("video", ["--temperature", "-0.5"], r"--temperature: expected a finite number > 0; got -0.5"),
    ("video", ["--episodes", "0"], r"--episodes: expected an integer >= 1; got 0"),
    ("video", ["--episode-length", "0"], r"--episode-length: expected an integer >= 1; got 0"),
    ("video", ["--prior-context-frames", "0"], r"--prior-context-frames: expected an integer >= 1; got 0"),
    ("video", ["--guidance=-1"], r"--guidance: expected a finite number >= 0; got -1.0"),
    ("video", ["--eval-draws", "0"], r"--eval-draws: expected an integer >= 1; got 0"),
]


@pytest.mark.parametrize("script, argv, message", OPTION_CASES, ids=[f"{s}{' '.join(a)}" for s, a, _ in OPTION_CASES])
def test_bad_option_is_refused_at_parse_time(script, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].parse_args([*argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]   # argparse: usage, then one error line
    assert ": error: " in error and re.search(message, error), error


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--out " + str(tmp_path / "file") + ": not a writable folder"):
        train_cifar.main(["--out", str(tmp_path / "file"), "--data", str(tmp_path / "missing")])


# ----------------------------------------------------------------------------------- data files
def write_wav(path: Path, samples: np.ndarray, rate: int = 8000, truncate: int = 0) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 16000).astype("<i2").tobytes())
    if truncate:
        path.write_bytes(path.read_bytes()[:-truncate])


def fsdd_folder(root: Path, fault: str) -> Path:
    """A small FSDD layout with one fault: clips of two speakers, index 0 (test) and 5 (train)."""
    rec = root / "recordings"
    rec.mkdir(parents=True)
    tone = np.sin(np.arange(800) / 5.0)
    for digit in (0, 1):
        for speaker in ("ann", "bob"):
            for index in (0, 5):
                write_wav(rec / f"{digit}_{speaker}_{index}.wav", tone)
    (root / "alignments.tsv").write_text("file\tspeaker\tdigit\tword\tphone\tstart_s\tend_s\n"
                                         "0_ann_5.wav\tann\t0\tzero\tZ\t0.0\t0.1\n")
    if fault == "empty":
        write_wav(rec / "1_ann_5.wav", np.zeros(0))
    elif fault == "truncated":
        write_wav(rec / "1_ann_5.wav", tone, truncate=101)
    elif fault == "not-wav":
        (rec / "1_ann_5.wav").write_bytes(b"ID3 this is an mp3")
    elif fault == "digit":
        write_wav(rec / "12_ann_6.wav", tone)
    elif fault == "rate":
        write_wav(rec / "1_ann_5.wav", tone, rate=16000)
    elif fault == "test-only-speaker":
        write_wav(rec / "1_cid_0.wav", tone)
    elif fault == "alignments":
        with open(root / "alignments.tsv", "a") as f:
            f.write("0_bob_5.wav\tbob\t0\tzero\tZ\tzero\n")
    return root


DATA_CASES = [
    ("empty", r"1_ann_5.wav: holds no samples"),
    ("truncated", r"1_ann_5.wav: truncated: its header announces 800 frames, the file holds 749"),
    ("not-wav", r"1_ann_5.wav: not a readable PCM WAV file"),
    ("digit", r"12_ann_6.wav: expected the FSDD name \{digit 0-9\}_\{speaker\}_\{index\}.wav"),
    ("rate", r"1_ann_5.wav: 16000 Hz, FSDD is 8 kHz"),
    ("test-only-speaker", r"speaker cid has test clips \(index 0-4\) but no training clips"),
    ("alignments", r"alignments.tsv line 3: expected 7 tab-separated columns"),
]


@pytest.mark.parametrize("fault, message", DATA_CASES, ids=[f for f, _ in DATA_CASES])
def test_bad_speech_file_is_refused_when_loaded(fault, message, tmp_path):
    root = fsdd_folder(tmp_path / "fsdd", fault)
    with pytest.raises(files.DataError, match=message):
        speech.load_speech(root, 8000)


def test_speech_folder_without_faults_loads(tmp_path):
    data = speech.load_speech(fsdd_folder(tmp_path / "fsdd", "none"), 8000)
    assert data.speakers == ["ann", "bob"] and len(data.train.audio) == len(data.test.audio) == 4


def image_folder(root: Path, value: int = 0) -> Path:
    from PIL import Image
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), value + i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_corrupt_image_is_refused_naming_the_file(tmp_path):
    root = image_folder(tmp_path / "images")
    (root / "train/dog/1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(files.DataError, match=r"train/dog/1.png is not a readable image"):
        images.load_cifar10(root, tmp_path / "cache")


def test_image_cache_follows_the_folder_content(tmp_path):
    root, cache = image_folder(tmp_path / "images"), tmp_path / "cache"
    assert images.load_cifar10(root, cache)["train_x"].max() == 1
    image_folder(root, value=100)                     # same names, new pixels (and new mtimes)
    os.utime(root, (1, 1))                            # even with the folder's own mtime unchanged
    assert images.load_cifar10(root, cache)["train_x"].max() == 101
    (root / "train/cat/0.png").unlink()
    assert len(images.load_cifar10(root, cache)["train_x"]) == 3
    other = image_folder(tmp_path / "elsewhere" / "images", value=50)   # same folder name, other content
    assert images.load_cifar10(other, cache)["train_x"].max() == 51


def test_corrupt_cache_is_rebuilt_with_a_message(tmp_path, capsys):
    root, cache = image_folder(tmp_path / "images"), tmp_path / "cache"
    images.load_cifar10(root, cache)
    (npz,) = cache.glob("*.npz")
    npz.write_bytes(b"not a zip")
    assert images.load_cifar10(root, cache)["train_x"].shape == (4, 3, 32, 32)
    assert "unreadable cache" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- model API
pixelcnn = vqvae.GatedPixelCNN(vqvae.GatedPixelCNNConfig(8, channels=4, num_layers=1, kernel_size=3, num_classes=3))
wavenet = vqvae.WaveNet(vqvae.WaveNetConfig(num_categories=8, num_speakers=2, hop=1, channels=4, skip_channels=4,
                                            num_layers=2, cycle=2))
video_prior = vqvae.ActionConditionalPrior(vqvae.ActionConditionalPriorConfig(
    8, num_actions=3, context_frames=2, channels=4, num_layers=1, context_channels=4, context_layers=1))
codes = torch.zeros(2, 3, 3, dtype=torch.long)
API_CASES = {
    "sample-temperature-0": (lambda: pixelcnn.sample((2, 2), torch.tensor([0]), temperature=0),
                             r"temperature: expected a finite number > 0; got 0"),
    "sample-temperature-negative": (lambda: pixelcnn.sample((2, 2), torch.tensor([0]), temperature=-1.0),
                                    r"temperature: expected a finite number > 0; got -1.0"),
    "wavenet-temperature-0": (lambda: wavenet.sample(None, torch.tensor([0]), length=3, temperature=0.0),
                               r"temperature: expected a finite number > 0; got 0.0"),
    "video-temperature-nan": (lambda: video_prior.sample(torch.zeros(1, 2, 3, 3, dtype=torch.long),
                                                           torch.zeros(1, 2, dtype=torch.long), temperature=math.nan),
                              r"temperature: expected a finite number > 0; got nan"),
    "sample-guidance-negative": (lambda: pixelcnn.sample((2, 2), torch.tensor([0, 1]), guidance=-1.0),
                                 r"guidance: expected a finite number >= 0; got -1.0"),
    "sample-guidance-odd-batch": (lambda: pixelcnn.sample((2, 2), torch.tensor([0, 1, 2]), guidance=1.0),
                                  r"label: expected a batch of 2 blocks for guidance .*got 3"),
    "label-out-of-range": (lambda: pixelcnn(codes, torch.tensor([0, 3])),
                           r"label: values must lie in \[0, 3\); got range \[0, 3\]"),
    "label-negative": (lambda: pixelcnn(codes, torch.tensor([-1, 0])), r"label: values must lie in \[0, 3\)"),
    "label-length-1-broadcast": (lambda: pixelcnn(codes, torch.tensor([1])),
                                 r"label: expected an integer \(2,\) tensor, one id per example; got shape \(1,\)"),
    "label-float": (lambda: pixelcnn(codes, torch.tensor([0.0, 1.0])), r"label: expected an integer \(2,\) tensor"),
    "speaker-out-of-range": (lambda: wavenet(torch.zeros(1, 4, dtype=torch.long), None, torch.tensor([2])),
                             r"speaker: values must lie in \[0, 2\); got range \[2, 2\]"),
    "speaker-length": (lambda: wavenet(torch.zeros(3, 4, dtype=torch.long), None, torch.tensor([0])),
                       r"x: expected an integer \(B, T\) tensor with B = 1 speakers"),
    "x-float64-into-float32-model": (lambda: vqvae.VQVAE(vqvae.VQVAEConfig(
        in_channels=1, hidden_channels=8, res_channels=4, num_res_layers=1, embedding_dim=4, num_embeddings=8))(
        torch.randn(1, 1, 8, 8, dtype=torch.float64)),
        r"x: expected a \(B, 1, \*S\) tensor of the model's dtype torch.float32 .*dtype torch.float64"),
    "action-out-of-range": (lambda: video_prior(codes[:1], torch.zeros(1, 2, 3, 3, dtype=torch.long),
                                                torch.tensor([3])), r"action: values must lie in \[0, 3\)"),
}


@pytest.mark.parametrize("call, message", API_CASES.values(), ids=API_CASES.keys())
def test_bad_model_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_quantizer_takes_float16_and_float64_latents(dtype):
    out = vqvae.VectorQuantizer(8, 4)(torch.randn(2, 4, 3, dtype=dtype))
    assert out.z_q.dtype == dtype and out.codes.shape == (2, 3)


# ------------------------------------------------------------------------------------- runs
TINY = ["--hidden-channels", "16", "--res-channels", "8", "--num-res-layers", "1", "--embedding-dim", "8", "--num-embeddings", "32",
        "--batch-size", "8", "--max-train-images", "96", "--max-test-images", "40", "--log-every", "1",
        "--stages", "vqvae", "--steps", "2", "--lr-schedule", "constant"]  # constant: resumed runs lengthen


def run(out, data_dir, *extra):
    train_cifar.main(["--data", str(CIFAR), "--data-dir", str(data_dir), "--out", str(out), *TINY, *extra])


RESUME_CASES = [
    (["--lr", "0.5"], r"was trained with --lr 0.001 \(now 0.5\); resume with those values, or train into another --out"),
    (["--commitment-cost", "1.0"], r"--commitment-cost 0.25 \(now 1.0\)"),
    (["--hidden-channels", "24"], r"--hidden-channels 16 \(now 24\)"),
    (["--seed", "1", "--batch-size", "4"], r"--batch-size 8 \(now 4\), --seed 0 \(now 1\)"),
    (["--preset", "sonnet", *TINY], r"--preset quick \(now sonnet\)"),
]


@pytest.mark.parametrize("extra, message", RESUME_CASES, ids=[" ".join(e[:2]) for e, _ in RESUME_CASES])
def test_resume_with_other_options_is_refused_before_any_step(extra, message, tmp_path, data_dir):
    out = tmp_path / "run"
    run(out, data_dir)
    before = files.load_checkpoint(out / "vqvae.pt")
    with pytest.raises(SystemExit, match=message):
        run(out, data_dir, "--resume", "--steps", "4", *extra)
    assert files.load_checkpoint(out / "vqvae.pt")["step"] == before["step"] == 2


def test_resume_may_change_length_logging_and_stages(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    run(out, data_dir, "--resume")
    assert "--resume: no " in capsys.readouterr().out     # nothing to resume: says it starts fresh
    run(out, data_dir, "--resume", "--steps", "3", "--log-every", "2", "--checkpoint-every", "5")
    assert files.load_checkpoint(out / "vqvae.pt")["step"] == 3


@pytest.mark.parametrize("schedule", ["cosine", "cooldown"])
def test_resume_may_not_lengthen_a_schedule_that_depends_on_the_length(schedule, tmp_path, data_dir):
    out = tmp_path / "run"
    run(out, data_dir, "--lr-schedule", schedule)
    with pytest.raises(SystemExit, match=rf"--steps 2 \(now 3\) \(the --lr-schedule {schedule} rates depend on --steps\)"):
        run(out, data_dir, "--lr-schedule", schedule, "--resume", "--steps", "3")


def test_checkpoint_without_recorded_options_is_not_resumed(tmp_path, data_dir):
    out = tmp_path / "run"
    run(out, data_dir)
    state = files.load_checkpoint(out / "vqvae.pt")
    del state["options"]
    files.save_checkpoint(out / "vqvae.pt", state)
    with pytest.raises(SystemExit, match="does not record the options, data and processes it was trained with"):
        run(out, data_dir, "--resume", "--steps", "3")


# ------------------------------------------------------------------ faults of a careful user's pass
MORE_OPTION_CASES = [
    (["--seed", "-1"], r"argument --seed: expected an integer >= 0 and < 4294967296; got -1"),
    (["--seed", str(2 ** 70)], r"argument --seed: expected an integer >= 0 and < 4294967296; got 1180591620717411303424"),
    (["--image-size", "30"], r"--image-size: expected a multiple of 4; got 30"),
]


@pytest.mark.parametrize("argv, message", MORE_OPTION_CASES, ids=[" ".join(a) for a, _ in MORE_OPTION_CASES])
def test_out_of_range_seed_is_refused_at_parse_time(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_cifar.parse_args([*argv, "--out", str(tmp_path / "run")])
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


@pytest.mark.parametrize("device, message", [
    ("foo", r"--device: expected auto, cpu, cuda or cuda:N; got 'foo'"),
    ("cuda:99" if torch.cuda.is_available() else "cuda", r"--device cuda(:99)?: (no CUDA GPU is visible|only \d)"),
])
def test_unusable_device_is_refused_in_one_line_before_any_work(device, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train_cifar.main(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "missing"), "--device", device])


def test_leftover_temporary_checkpoint_is_deleted_and_a_users_files_are_kept(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    run(out, data_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                                                  # a process that no longer runs
    (out / f"vqvae.{dead.pid}.tmp.pt").write_bytes((out / "vqvae.pt").read_bytes()[:5000])   # killed mid-write
    users = ["notes.tmp.txt", "data.tmp", f"vqvae.{os.getpid()}x.tmp.pt", f"prior.{os.getppid()}.tmp.pt"]
    for name in users:                  # not the pattern, or the temporary file of a process that lives
        (out / name).write_text("mine")
    run(out, data_dir, "--resume", "--stages", "eval")
    assert f"vqvae.{dead.pid}.tmp.pt: left by an interrupted write of process {dead.pid}; deleted" in capsys.readouterr().out
    assert (out / "metrics.json").exists() and sorted(f.name for f in out.glob("*.tmp*")) == sorted(users)
    assert all((out / name).read_text() == "mine" for name in users)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[:3000]), r"vqvae.pt: not a readable checkpoint"),
    (lambda path: path.write_bytes(b"garbage" * 100), r"vqvae.pt: not a readable checkpoint \(not an archive"),
    (lambda path: (lambda s: (s["model"][next(iter(s["model"]))].view(-1)[:1].add_(1), torch.save(s, path)))(
        torch.load(path, weights_only=True)), r"vqvae.pt: damaged: its tensors do not match the checksum"),
], ids=["truncated", "garbage", "flipped-weight"])
def test_damaged_checkpoint_is_refused_naming_the_file(damage, message, tmp_path, data_dir):
    out = tmp_path / "run"
    run(out, data_dir)
    damage(out / "vqvae.pt")
    with pytest.raises(SystemExit, match=message):
        run(out, data_dir, "--resume", "--stages", "eval")


def test_models_of_other_training_data_are_refused_and_caches_follow_the_data(tmp_path):
    from PIL import Image
    root = tmp_path / "images"
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 40 * i + (c == "dog") * 9, np.uint8)).save(root / split / c / f"{i}.png")
    argv = ["--data", str(root), "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--hidden-channels", "8", "--res-channels", "4", "--num-res-layers", "1", "--embedding-dim", "4",
            "--num-embeddings", "8", "--batch-size", "2", "--steps", "2", "--prior-channels", "4",
            "--prior-num-layers", "1", "--prior-batch-size", "2", "--prior-steps", "2", "--stages", "vqvae,prior"]
    train_cifar.main(argv)
    os.replace(root / "train/cat/3.png", root / "train/dog/9.png")     # an image moves to another class
    (tmp_path / "run/prior.pt").unlink()
    with pytest.raises(SystemExit, match=r"vqvae.pt was trained on other data \(content key \w+, now \w+\)"):
        train_cifar.main(argv[:-2] + ["--stages", "prior", "--resume"])   # its codes would get the old labels
    with pytest.raises(SystemExit, match=r"vqvae.pt was trained with other training data \(content key \w+, now \w+\)"):
        train_cifar.main(argv[:-2] + ["--stages", "vqvae", "--resume"])

    made = []
    def make():
        made.append(1)
        return {"codes": torch.zeros(2)}
    for key in ("a", "a", "b"):
        run = runs.Run(tmp_path / "run", torch.device("cpu"), options={"training_data": key})
        run.vqvae_id = "step 2, sha256 0"
        run.cached("codes", {"clip_length": 64}, make)
    assert len(made) == 2                                              # made again for other data


def test_image_cache_tells_apart_same_size_images_swapped_with_one_mtime(tmp_path):
    from PIL import Image
    root = image_folder(tmp_path / "images")
    a, b = root / "train/cat/0.png", root / "train/dog/0.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(a)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(b)
    for f in (a, b):
        os.utime(f, ns=(10**18, 10**18))
    first = images.load_cifar10(root, tmp_path / "cache")
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b), b.write_bytes(data_a)                        # swapped, same sizes
    for f in (a, b):
        os.utime(f, ns=(10**18, 10**18))
    second = images.load_cifar10(root, tmp_path / "cache")
    assert not np.array_equal(first["train_x"], second["train_x"])
    assert second["train_x"][np.flatnonzero(second["train_y"] == 0)[0]].max() == 200


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, mode):
    from PIL import Image
    root = image_folder(tmp_path / "images")
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)     # 0 .. 65472
    Image.fromarray(ramp).save(root / "train/cat/0.png")                  # a 16-bit grayscale PNG (I;16)
    data = images.read_image_folder(root, channels=1 if mode == "L" else 3)
    image = data["train_x"][0].astype(float)
    expected = np.round(ramp / 257)
    assert np.abs(image[0] - expected).max() <= 1 and image.max() >= 250 and (image < 128).mean() > 0.45


def test_all_black_training_images_are_refused_before_training(tmp_path):
    root = image_folder(tmp_path / "images")
    from PIL import Image
    for f in (root / "train").rglob("*.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    with pytest.raises(SystemExit, match=r"every training pixel has the same value \(variance 0\)"):
        train_cifar.main(["--data", str(root), "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run/vqvae.pt").exists()


def test_prior_batch_larger_than_the_images_is_refused_before_the_vqvae_trains(tmp_path):
    root = image_folder(tmp_path / "images")
    with pytest.raises(SystemExit, match=r"--prior-batch-size 32 x 1 process\(es\): more than the 4 training images"):
        train_cifar.main(["--data", str(root), "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run/vqvae.pt").exists()


def test_non_utf8_file_name_is_named_in_the_refusal(tmp_path):
    root = image_folder(tmp_path / "images")
    bad = os.fsencode(root / "train/cat") + b"/\xff\xfe.png"
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(files.DataError, match=r"train/cat/\ufffd\ufffd.png is not a readable image") as error:
        images.load_cifar10(root, tmp_path / "cache")
    str(error.value).encode()    # printable


@pytest.mark.parametrize("load", [
    lambda root, cache: images.load_cifar10(image_folder(root / "images"), cache),
    lambda root, cache: speech.load_speech(fsdd_folder(root / "fsdd", "none"), 8000, data_dir=cache),
], ids=["images", "speech"])
def test_data_dir_that_cannot_be_made_is_refused_before_decoding(load, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"--data-dir .*/file/cache: cannot be created or written \(Not a directory\)"):
        load(tmp_path, tmp_path / "file" / "cache")


@pytest.mark.parametrize("lr", ["30", "1e6"])
def test_a_learning_rate_that_diverges_stops_the_run_naming_the_cause_not_the_input(lr, tmp_path, data_dir):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"\[vqvae\] step \d+: .* not finite; stopped without saving\. Last good "
                                         r"checkpoint: .*(start again|--resume) with a lower --lr"):
        run(out, data_dir, "--lr", lr, "--steps", "20", "--log-every", "100")
    if (out / "vqvae.pt").exists():   # whatever was kept gives a finite loss: a lower rate continues from it
        run(out, data_dir, "--lr", "1e-3", "--steps", "20", "--resume")


# ------------------------------------------------------------------ the third pass (issue 44)
def test_eval_after_a_checkpoint_of_no_history_point_writes_its_metrics(tmp_path, data_dir):
    """A checkpoint saved before the first --log-every step (Ctrl-C early, a divergence at step 1)
    holds an empty history: evaluation draws no curve for it and still writes metrics.json."""
    out = tmp_path / "run"
    run(out, data_dir)
    state = files.load_checkpoint(out / "vqvae.pt")
    files.save_checkpoint(out / "vqvae.pt", {**state, "history": {"step": []}})
    run(out, data_dir, "--resume", "--stages", "eval")
    assert json.loads((out / "metrics.json").read_text())["metrics"]["test_codes_used"] > 0
    assert not (out / "vqvae_curves.png").exists() and (out / "reconstructions.png").exists()


def test_a_codebook_whose_prior_cannot_fit_is_refused_before_any_training(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(guards, "available_memory", lambda device: 16 * 2 ** 30)
    with pytest.raises(SystemExit, match=r"--num-embeddings 1048576: the prior's logits of a batch, with their "
                                         r"softmax and gradient, needs about 24.0 GiB on cpu, which has 16.0 GiB "
                                         r"free: lower --num-embeddings or --prior-batch-size"):
        run(tmp_path / "run", data_dir, "--num-embeddings", "1048576", "--stages", "vqvae,prior",
            "--prior-batch-size", "32")
    assert not (tmp_path / "run" / "vqvae.pt").exists()


@pytest.mark.parametrize("option", ["--out", "--data-dir"])
def test_a_folder_the_run_writes_inside_data_is_refused(option, tmp_path):
    root = image_folder(tmp_path / "images")
    argv = ["--data", str(root), "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "cache")]
    argv[argv.index(option) + 1] = str(root / "train" / "zz_run")
    with pytest.raises(SystemExit, match=rf"{option} .*train/zz_run: inside --data .*images, where the run's own files "
                                         r"would be read as data"):
        train_cifar.main(argv)
    assert not (root / "train" / "zz_run").exists()


def test_a_data_dir_that_passes_os_access_but_cannot_be_written_is_refused_before_decoding(tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    with pytest.raises(SystemExit, match=r"--data-dir /proc/x: cannot be created or written"):
        images.load_cifar10(image_folder(tmp_path / "images"), Path("/proc/x"))


def test_a_float_wav_holding_nan_is_refused_naming_the_file(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    root = fsdd_folder(tmp_path / "fsdd", "none")
    samples = np.sin(np.arange(800) / 5.0).astype(np.float32)
    samples[100] = np.nan
    soundfile.write(root / "recordings" / "1_bob_5.wav", samples, 8000, subtype="FLOAT")
    with pytest.raises(files.DataError, match=r"1_bob_5.wav: holds 1 NaN or infinite samples"):
        speech.load_speech(root, 8000)


@pytest.mark.parametrize("lr", ["0.5", "0.1"])
def test_an_exploding_loss_is_no_good_checkpoint_and_the_advice_works(lr, tmp_path, data_dir):
    """Weights a too large step sent off are finite, with a loss of 1e13 or more: not good, so nothing
    is saved, and starting again with a lower --lr, as the message advises, trains."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"\[vqvae\] step 1: the loss is exploding \(.* on the next batch, over 10x "
                                         r"the first step's .*\); stopped without saving\. Last good checkpoint: none: "
                                         r"start again with a lower --lr"):
        run(out, data_dir, "--lr", lr, "--checkpoint-every", "1", "--steps", "3")
    assert not (out / "vqvae.pt").exists()
    run(out, data_dir, "--lr", "1e-3", "--checkpoint-every", "1", "--steps", "3")
    assert files.load_checkpoint(out / "vqvae.pt")["step"] == 3


def test_resume_of_another_experiments_folder_names_it(tmp_path, data_dir):
    out = tmp_path / "run"
    run(out, data_dir)
    with pytest.raises(SystemExit, match=r"--resume: .*vqvae.pt was written by the cifar experiment, not by this "
                                         r"speech one: train into another --out"):
        train_vctk.main(["--data", str(fsdd_folder(tmp_path / "fsdd", "none")), "--out", str(out), "--resume",
                         "--stages", "vqvae", "--steps", "2", "--crop", "256", "--batch-size", "2"])


def test_a_foreign_pickle_is_refused_without_advising_to_unpickle_it(tmp_path, data_dir):
    out = tmp_path / "run"
    run(out, data_dir)
    torch.save({"model": Path("x")}, out / "vqvae.pt")   # an object weights_only refuses to build
    with pytest.raises(SystemExit) as refused:
        run(out, data_dir, "--resume", "--stages", "eval")
    assert re.search(r"vqvae.pt: not a checkpoint of this project: it holds Python objects .* it was not loaded",
                     str(refused.value)) and "weights_only" not in str(refused.value)


def test_a_full_disk_says_which_file_failed_and_what_was_kept(tmp_path, data_dir):
    """A real full disk: --out on a 1 MiB tmpfs, where the first checkpoint fits and the second does not."""
    out = tmp_path / "run"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        run(out, data_dir, "--checkpoint-every", "1", "--steps", "1")       # about 0.5 MB: fits
        ballast = out / "ballast"
        ballast.write_bytes(b"\0" * (out.stat().st_blksize * 8))
        free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
        ballast.write_bytes(b"\0" * max(0, len(ballast.read_bytes()) + free - 100_000))   # 100 kB left
        with pytest.raises(SystemExit, match=rf"no space left on the device of {out}: writing vqvae.pt failed and "
                                             r"the earlier vqvae.pt is kept; free some space"):
            run(out, data_dir, "--checkpoint-every", "1", "--steps", "2", "--resume")
        assert files.load_checkpoint(out / "vqvae.pt")["step"] == 1 and not list(out.glob("*.tmp*"))
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_a_model_read_back_on_a_gpu_that_is_not_there_is_refused_in_one_line(tmp_path, data_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = tmp_path / "run"
    run(out, data_dir)
    with pytest.raises(SystemExit, match=r"--device cuda: no CUDA GPU is visible"):
        runs.load_run(out, device="cuda")


def test_a_jpegs_exif_orientation_is_applied(tmp_path):
    from PIL import Image
    root = image_folder(tmp_path / "images")
    upright = np.zeros((32, 32, 3), np.uint8)
    upright[:8] = 255                                                   # a white band at the top
    image = Image.fromarray(np.rot90(upright).copy())                   # stored turned, the band on the left
    exif = image.getexif()
    exif[0x0112] = 6                                                    # "rotate 90 degrees clockwise to view"
    image.save(root / "train" / "cat" / "0.jpg", exif=exif, quality=100)
    (root / "train" / "cat" / "0.png").unlink()
    data = images.read_image_folder(root)
    top = data["train_x"][0]                                            # train/cat/0.jpg, the first image
    assert top[:, :8].mean() > 200 and top[:, 8:].mean() < 50
