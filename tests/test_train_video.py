"""The video experiment's script (Sec. 4.4): its options, the transition bookkeeping and the
pairing of frames with actions, and a few-step run of every stage, shared by the tests of what it
leaves behind. The environment, the measures and the action classifier (lab/episodes.py,
lab/video_eval.py) are tested in tests/lab/test_video.py; the models in test_video_model.py."""
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import train_video
import vqvae
from conftest import require_vizdoom
from lab import episodes, files, guards, runs, video_eval

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], r"argument --seed: expected an integer >= 0\b.*; got -1"),
    (["--seeds", "0", "-2"], r"argument --seeds: expected an integer >= 0\b.*; got -2"),
    (["--seeds", str(2 ** 32)], r"argument --seeds: expected an integer >= 0 and < 4294967296; got 4294967296"),
    (["--seeds", "1", "1"], r"--seeds: expected distinct seeds; got 1 1"),
    (["--action-classifier-steps", "0"], r"--action-classifier-steps: expected an integer >= 1 .*got 0"),
    (["--prior-context-frames", "7"], r"--prior-context-frames: expected 1\.\.6 \(the given frames\); got 7"),
    (["--episode-length", "15"], r"--episode-length: expected at least 16; got 15"),
    (["--guidance", "nan"], r"--guidance: expected a finite number >= 0; got nan"),
])
def test_bad_option_is_refused_at_parse_time(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_video.parse_args([*argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in error and re.search(message, error), error


def test_presets_set_the_defaults_and_the_evaluation_options_may_change_on_resume(tmp_path):
    args = train_video.parse_args(["--out", str(tmp_path)])
    assert args.action_classifier_steps == 9000 and args.prior_lr_schedule == "cooldown" and args.guidance == 0.5
    assert {"temperature", "guidance", "eval_draws", "action_classifier_steps", "data_dir"} <= set(args.resumable)
    assert train_video.parse_args(["--preset", "paper", "--guidance", "0.25"]).guidance == 0.25


# ----------------------------------------------------------------------------- bookkeeping
def test_transitions_pair_each_next_frame_with_its_context_and_action():
    codes = (torch.arange(2)[:, None] * 100 + torch.arange(6))[:, :, None, None].expand(2, 6, 1, 1)  # frame id
    pairs = train_video.transitions(num_episodes=2, episode_length=5, context_frames=3)
    assert pairs.tolist() == [[e, t] for e in range(2) for t in (2, 3, 4)]   # t + 1 <= 5, t - 2 >= 0
    e, t = pairs.unbind(1)
    context = train_video.context_of(codes, e, t, 3)[:, :, 0, 0]
    assert context.tolist() == [[100 * e_ + t_ - 2, 100 * e_ + t_ - 1, 100 * e_ + t_] for e_, t_ in pairs.tolist()]


def horizontal_shift(before: torch.Tensor, after: torch.Tensor, max_shift: int = 30) -> int:
    """The shift s (pixels) that best aligns two grayscale frames (H, W): after[:, x] ~ before[:, x + s],
    i.e. s > 0 when the scene moved left. Rows 20-63 only: the sky and floor carry little texture."""
    a, b, width = before[20:64], after[20:64], before.shape[1]
    errors = [((a[:, s:] - b[:, :width - s]) if s >= 0 else (a[:, :width + s] - b[:, -s:])).pow(2).mean()
              for s in range(-max_shift, max_shift + 1)]
    return int(torch.stack(errors).argmin()) - max_shift


def test_each_transition_is_paired_with_the_action_that_produced_it(tmp_path_factory, vizdoom):
    """On real frames, through the indexing that training (transitions, context_of) and evaluation
    (eval_frames, eval_actions) use: after turn_left the scene moves right, after turn_right left.
    Pairing each frame with the previous or the next step's action instead agrees in only 72-84%
    of the turns of these episodes: the 90% asked here tells the pairings apart."""
    data_dir = tmp_path_factory.getbasetemp() / "video_data"   # shared with tests/lab/test_video.py
    data = train_video.collect(train_video.parse_args(["--data-dir", str(data_dir), "--episodes", "3",
                                                       "--test-episodes", "2", "--episode-length", "60"]))
    frames = data["train_frames"].float().mean(-1)                            # (E, T+1, 84, 84)
    actions = data["train_actions"]
    e, t = train_video.transitions(len(frames), actions.shape[1], context_frames=4).unbind(1)
    last, target, action = train_video.context_of(frames, e, t, 4)[:, -1], frames[e, t + 1], actions[e, t]
    shifts = torch.tensor([horizontal_shift(a, b) for a, b in zip(last, target)])
    left, right = action == episodes.ACTIONS.index("turn_left"), action == episodes.ACTIONS.index("turn_right")
    assert left.sum() > 30 and right.sum() > 30
    assert (shifts[left] < 0).float().mean() >= 0.9 and (shifts[right] > 0).float().mean() >= 0.9
    assert shifts[left].median() <= -6 and shifts[right].median() >= 6       # a turn moves the view ~11 px
    # Evaluation: generated frame 6 + k follows from frame 5 + k under eval_actions[k].
    turn = episodes.SCRIPTS.index("turn_right")
    truth = data["eval_frames"][:, turn].float().mean(-1)                     # (S, 16, 84, 84)
    assert (data["eval_actions"][:, turn] == episodes.ACTIONS.index("turn_right")).all()
    steps = [horizontal_shift(clip[train_video.GIVEN - 1 + k], clip[train_video.GIVEN + k])
             for clip in truth for k in range(train_video.GENERATED)]
    assert np.mean([s > 0 for s in steps]) >= 0.9


def test_code_stability_counts_codes_kept_at_the_best_horizontal_shift():
    """docs/video_code_stability.py on hand-made codes: a turn_right moves every code one cell left,
    forward keeps them, a turn_left moves them one cell right (new codes enter at the edge)."""
    path = Path(__file__).resolve().parents[1] / "docs" / "video_code_stability.py"
    spec = importlib.util.spec_from_file_location("video_code_stability", path)
    stability = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stability)
    f0 = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    f1 = torch.tensor([[1, 2, 3, 8], [5, 6, 7, 9]])          # turn_right: f1[j] = f0[j + 1]
    f3 = torch.tensor([[10, 1, 2, 3], [11, 5, 6, 7]])        # turn_left: f3[j] = f1[j - 1]
    codes = torch.stack([f0, f1, f1, f3])[None]              # (1 episode, 4 frames, 2, 4)
    actions = torch.tensor([[2, 0, 1]])                      # turn_right, forward, turn_left
    assert stability.equal_after_shift(f1, f0, 1) == 1.0 and stability.equal_after_shift(f1, f0, 0) == 0.0
    assert stability.equal_after_shift(f0, f1, 1) == pytest.approx(0.0)
    rows = {name: rest for name, *rest in stability.consecutive_frames(codes, actions, max_cells=2)}
    assert rows["forward"] == [1, 1.0, 0, 1.0]
    assert rows["turn_right"] == [1, 0.0, 1, 1.0]
    assert rows["turn_left"] == [1, 0.0, -1, 1.0]


def test_seeds_run_the_pipeline_once_per_seed_into_its_own_folder(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train_video, "run_pipeline", lambda args: seen.append(args))
    monkeypatch.setattr(train_video.video_eval, "summarize_seeds", lambda out, runs: seen.append((out, runs)))
    train_video.main(["--out", str(tmp_path), "--seeds", "3", "5", "--prior-steps", "7"])
    assert [(a.seed, a.out, a.seeds, a.prior_steps) for a in seen[:2]] == [
        (3, tmp_path / "seed_3", None, 7), (5, tmp_path / "seed_5", None, 7)]
    assert seen[2] == (tmp_path, [tmp_path / "seed_3", tmp_path / "seed_5"])


# ----------------------------------------------------------------------------- one run of every stage
# The tests below share one few-step run (trained_run) and run in this order: each later one may
# change what the earlier ones read (the action classifier, the codes cache).
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(argv, out, its first metrics.json) of one run of every stage with tiny sizes."""
    require_vizdoom()
    root = tmp_path_factory.mktemp("video_run")
    out = root / "run"
    argv = ["--data-dir", str(root / "data"), "--out", str(out), "--episodes", "2", "--test-episodes", "1",
            "--episode-length", "16", "--hidden-channels", "8", "--res-channels", "4", "--num-res-layers", "1",
            "--embedding-dim", "4", "--num-embeddings", "16", "--steps", "4", "--batch-size", "4",
            "--prior-context-frames", "2", "--prior-channels", "4", "--prior-num-layers", "1",
            "--prior-context-channels", "4", "--prior-context-layers", "1", "--prior-steps", "4",
            "--prior-batch-size", "4", "--action-classifier-steps", "4", "--eval-draws", "2", "--log-every", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_video.main(argv)
    finally:
        torch.set_num_threads(threads)
    return argv, out, json.loads((out / "metrics.json").read_text())


def test_all_stages_write_their_files_and_metrics_that_agree_with_their_curves(trained_run):
    argv, out, report = trained_run
    for name in ("vqvae.pt", "prior.pt", "codes.pt", "action_classifier.pt", "metrics.json", "reconstructions.png",
                 "codebook_usage.png", "error_curves.png", "video_forward.png", "video_turn_right.png",
                 "video_forward.gif"):
        assert (out / name).exists(), name
    metrics, curves = report["metrics"], report["curves"]
    for variant in (*video_eval.MODEL_PREDICTIONS, "copy_last_frame", "vqvae_reconstruction"):
        assert len(curves[f"mse_per_step_{variant}"]) == 10
        assert metrics[f"mse_{variant}"] == pytest.approx(np.mean(curves[f"mse_per_step_{variant}"]))
    assert report["timings"]["collect_seconds"] > 0 and report["timings"]["action_classifier_seconds"] > 0
    assert {k: v["options"] for k, v in report["checkpoints"].items()} == {
        "action_classifier.pt": {}, "prior.pt": {}, "vqvae.pt": {}}
    model, prior = runs.load_run(out)  # the one loader of any run
    assert isinstance(model, vqvae.VQVAE) and isinstance(prior, vqvae.ActionConditionalPrior)
    assert report["prior_config"] == dataclasses.asdict(prior.config)
    assert torch.equal(prior.codebook, model.quantizer.codebook)   # the context frames enter as z_q


def test_a_finished_run_is_not_overwritten_without_resume(trained_run):
    argv, out, report = trained_run
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        train_video.main(argv)


def test_eval_is_repeatable_from_the_checkpoints_with_the_action_classifier_read_back(trained_run, monkeypatch):
    argv, out, report = trained_run
    # The action classifier of the action_classifier stage, made from this VQ-VAE and these
    # episodes and settings: read back by an evaluation alone.
    assert files.load_checkpoint(out / "action_classifier.pt")["made_from"]["steps"] == 4
    monkeypatch.setattr(train_video, "train_action_classifier", lambda *a, **k: pytest.fail("action classifier trained"))
    train_video.main(argv + ["--resume", "--stages", "eval", "--prior-lr-schedule", "constant"])
    again = json.loads((out / "metrics.json").read_text())
    assert again["curves"] == report["curves"]
    # The eval-only command's options in config; what the prior was trained with beside them.
    assert again["config"]["prior_lr_schedule"] == "constant"
    assert again["checkpoints"]["prior.pt"]["options"] == {"prior_lr_schedule": "cooldown"}


def test_draw_0_does_not_depend_on_the_draws_after_it_and_other_steps_train_another_classifier(trained_run):
    argv, out, report = trained_run
    curves = report["curves"]
    # Draw 0 does not depend on how many draws follow it; the mean of one draw is that draw.
    with pytest.raises(SystemExit, match="action_classifier.pt: missing, unfinished, or made from another VQ-VAE"):
        train_video.main(argv + ["--resume", "--stages", "eval", "--action-classifier-steps", "3"])
    train_video.main(argv + ["--resume", "--stages", "action_classifier,eval", "--eval-draws", "1",
                             "--action-classifier-steps", "3"])
    one = json.loads((out / "metrics.json").read_text())["curves"]
    for variant in ("true_actions", "shuffled_actions"):
        assert one[f"mse_per_step_{variant}"] == curves[f"mse_per_step_{variant}"]
        assert one[f"mse_per_step_mean_of_draws_{variant}"] == pytest.approx(one[f"mse_per_step_{variant}"], rel=1e-6)
        assert curves[f"mse_per_step_mean_of_draws_{variant}"] != curves[f"mse_per_step_{variant}"]
    # The action classifier was made for this VQ-VAE and seed; one for other steps is trained anew.
    made_from = files.load_checkpoint(out / "action_classifier.pt")["made_from"]
    vqvae_id = guards.model_fingerprint(files.load_checkpoint(out / "vqvae.pt"))
    assert made_from["steps"] == 3 and made_from["vqvae"] == vqvae_id and made_from["seed"] == 0


def test_codes_are_cached_for_one_vqvae_and_one_set_of_episodes(trained_run):
    """Other held-out episodes (here: the first training one) are encoded anew."""
    argv, out, report = trained_run
    args = train_video.parse_args(argv + ["--resume"])
    run = runs.Run.start(args)
    data = train_video.collect(args)
    run.use_data(data["train_frames"], data["train_actions"])
    model = run.load("vqvae")
    cached = train_video.frame_codes(run, model, data)
    saved = files.load_checkpoint(out / "codes.pt")
    assert torch.equal(cached["test"], saved["test"]) and saved["made_from"]["vqvae"] == run.vqvae_id
    data.update(test_frames=data["train_frames"][:1], test_seeds=data["train_seeds"][:1])
    fresh = train_video.frame_codes(run, model, data)
    assert torch.equal(fresh["test"], episodes.encode_frames(model, data["test_frames"], "cpu").to(torch.int16))
    assert files.load_checkpoint(out / "codes.pt")["made_from"]["test_seeds"] == data["train_seeds"][:1].tolist()
