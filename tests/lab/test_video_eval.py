"""lab/video_eval.py: the action classifier (its features, its scoring, and its training by
train_video.py's action_classifier stage through the one training loop: cached for what it is
made from, deterministic and resumable), and the summary of several seeds. The collection is
tested in test_episodes.py, the script in tests/test_train_video.py."""
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_video
import vqvae
from conftest import require_vizdoom
from lab import episodes as video_data
from lab import files, guards, train, video_eval
from lab.runs import Run

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


@pytest.fixture(scope="module")
def long_episodes(tmp_path_factory):
    """Three training and two held-out episodes of 60 actions, collected once into the session's
    shared data folder (tests/test_train_video.py reads the same cache)."""
    require_vizdoom()
    return video_data.collect_episodes(tmp_path_factory.getbasetemp() / "video_data", 3, 2, 60, frame_skip=4,
                                       max_hold=4, seed=0, given=6, generated=10)


# ----------------------------------------------------------------------------- the action classifier's features
def test_frame_pairs_put_each_frame_beside_the_next():
    frames = torch.arange(2 * 4).reshape(2, 4, 1, 1, 1).expand(2, 4, 3, 2, 2)     # value = frame id
    pairs = video_eval.frame_pairs(frames)
    assert pairs.shape == (2, 3, 2, 3, 2, 2)
    assert pairs[..., 0, 0, 0].tolist() == [[[4 * e + t, 4 * e + t + 1] for t in range(3)] for e in range(2)]


def best_horizontal_shifts(pairs: torch.Tensor) -> torch.Tensor:
    """The shift (B,) of the classifier's cost volume that best matches x_t+1 to x_t, per pair."""
    classifier = video_eval.ActionClassifier(channels=8)   # the cost volume has no weights
    cost = classifier.cost_volume(pairs)
    assert cost.shape == (len(pairs), 2 * classifier.max_shift + 1 + 2 * classifier.max_vertical_shift + 1, 21, 21)
    return cost[:, :2 * classifier.max_shift + 1].sum((2, 3)).argmin(1) - classifier.max_shift


def turn_shifts(shifts: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shifts of the transitions labelled turn_left and of those labelled turn_right."""
    return shifts[actions == video_data.ACTIONS.index("turn_left")], shifts[actions == video_data.ACTIONS.index("turn_right")]


def test_cost_volume_of_real_turns_points_the_way_the_view_moved(long_episodes, vizdoom):
    """The classifier's features on real frames: the shift that best matches frame t+1 to frame t
    is to the left after turn_left and to the right after turn_right, by about a turn (11 px); the
    mirrored transitions the classifier also trains on (video_eval.mirror) are labelled the other turn
    and move the other way, and `forward` stays forward."""
    data = long_episodes
    frames = data["train_frames"].movedim(-1, -3)                               # (E, T+1, 3, 84, 84)
    pairs, actions = video_eval.frame_pairs(frames).flatten(0, 1), data["train_actions"].flatten()
    mirrored_pairs, mirrored_actions = video_eval.mirror(pairs, actions)
    forward = video_data.ACTIONS.index("forward")
    assert torch.equal(mirrored_actions == forward, actions == forward) and not torch.equal(mirrored_actions, actions)
    for shifts, acts in ((best_horizontal_shifts(pairs), actions), (best_horizontal_shifts(mirrored_pairs), mirrored_actions)):
        left, right = turn_shifts(shifts, acts)
        assert len(left) > 20 and len(right) > 20
        assert (left < 0).float().mean() >= 0.9 and (right > 0).float().mean() >= 0.9
        assert -14 <= left.median() <= -8 and 8 <= right.median() <= 14


@pytest.mark.parametrize("dim, shift", [(-1, 3), (-1, -5), (-2, 2), (-2, -4)])
def test_shift_costs_are_lowest_at_the_shift_between_the_frames(dim, shift):
    """x_t+1[i] = x_t[i + shift] along dim on a random texture: its costs are lowest at that shift,
    away from the edges that the shift brings in."""
    texture = torch.rand(1, 1, 120, 120, generator=torch.Generator().manual_seed(0))
    dy, dx = (shift, 0) if dim == -2 else (0, shift)
    gray = torch.cat([texture[..., 16:100, 16:100], texture[..., 16 + dy:100 + dy, 16 + dx:100 + dx]], 1)
    cost = video_eval.shift_costs(gray, 8, dim)
    assert cost.shape == (1, 17, 21, 21)
    assert int(cost[..., 3:-3, 3:-3].sum((2, 3)).argmin(1)) - 8 == shift


# ----------------------------------------------------------------------------- scoring
class HeadingOracle(torch.nn.Module):
    """Names the action from a heading h written into every pixel as 5 h: h + 1 is turn_right,
    h - 1 turn_left, h forward."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pairs):
        step = (pairs[:, 1, 0, 0, 0].long() - pairs[:, 0, 0, 0, 0].long()) // 5
        index = {0: "forward", -1: "turn_left", 1: "turn_right"}
        return torch.nn.functional.one_hot(torch.tensor([video_data.ACTIONS.index(index[int(s)]) for s in step]), 3)


def frames_of_headings(headings: torch.Tensor) -> torch.Tensor:
    """(..., T) headings -> frames (..., T, 3, 4, 4) in [0, 1] that HeadingOracle reads."""
    return (headings[..., None, None, None] * 5 / 255).expand(*headings.shape, 3, 4, 4).float()


def test_each_generated_transition_is_scored_against_the_action_it_was_given():
    turn = torch.tensor([0, -1, 1])                                          # heading change per action
    g = torch.Generator().manual_seed(0)
    actions, test_actions = torch.randint(0, 3, (2, 3, 10), generator=g), torch.randint(0, 3, (4, 8), generator=g)
    start = torch.full((2, 3, 1), 25)
    followed = start + turn[actions].cumsum(-1)                              # headings after each action
    videos = {"vqvae_reconstruction": frames_of_headings(followed), "true_actions": frames_of_headings(followed),
              "shuffled_actions": frames_of_headings(followed)}               # ignores the shuffled actions
    test_headings = torch.cat([torch.full((4, 1), 25), 25 + turn[test_actions].cumsum(-1)], 1)
    test_frames = video_data.to_uint8(frames_of_headings(test_headings))
    test_frames[0, 3:] = test_frames[0, 2]            # episode 0 stands still from transition 2 on
    metrics = video_eval.action_accuracies(HeadingOracle(), test_frames, test_actions,
                                      frames_of_headings(start), videos, actions)
    wrong = (test_actions[0, 2:] != video_data.ACTIONS.index("forward")).sum().item()
    assert wrong > 0 and metrics["action_accuracy_real_test"] == pytest.approx(1 - wrong / test_actions.numel())
    assert metrics["action_accuracy_true_actions"] == metrics["action_accuracy_vqvae_reconstruction"] == 1.0
    agree = (video_data.shuffle_actions(actions) == actions).float()
    assert metrics["action_accuracy_shuffled_actions"] == pytest.approx(agree.mean().item())
    assert metrics["action_accuracy_per_step_shuffled_actions"] == pytest.approx(agree.mean((0, 1)).tolist())
    for v, name in enumerate(video_data.SCRIPTS):
        assert metrics[f"action_accuracy_{name}_shuffled_actions"] == pytest.approx(agree[:, v].mean().item())
    # With several draws every one is judged: here draw 0 follows the actions and draw 1 stands still.
    still = frames_of_headings(start.expand(2, 3, 10))
    videos["draws_true_actions"] = video_data.to_uint8(torch.stack([videos["true_actions"], still]))
    metrics = video_eval.action_accuracies(HeadingOracle(), test_frames, test_actions,
                                      frames_of_headings(start), videos, actions)
    forward = (actions == video_data.ACTIONS.index("forward")).float()
    assert 0 < forward.mean() < 1
    assert metrics["action_accuracy_true_actions"] == pytest.approx((1 + forward.mean().item()) / 2)
    assert metrics["action_accuracy_per_step_true_actions"] == pytest.approx(((1 + forward.mean((0, 1))) / 2).tolist())
    assert metrics["action_accuracy_forward_true_actions"] == pytest.approx((1 + forward[:, 0].mean().item()) / 2)


# ----------------------------------------------------------------------------- training the action classifier
def tiny_vqvae() -> vqvae.VQVAE:
    """A frame VQ-VAE (84x84x3 -> 21x21 codes) small enough to decode many frames quickly."""
    config = vqvae.VQVAEConfig(in_channels=3, hidden_channels=8, res_channels=4, num_res_layers=0, embedding_dim=4,
                               num_embeddings=8)
    return vqvae.VQVAE(config).eval()


def a_run(out, resume=False, checkpoint_every=100) -> Run:
    run = Run(out, torch.device("cpu"), resume=resume, log_every=2, checkpoint_every=checkpoint_every,
              options={"seed": 0, "world_size": 1})
    run.vqvae_id = "step 1, sha256 0123456789abcdef"
    return run


def action_classifier(run, model, codes, actions, steps, seed):
    """train_video.py's action_classifier stage."""
    args = dataclasses.make_dataclass("Args", ["out", "action_classifier_steps", "seed"])(run.out, steps, seed)
    return train_video.train_action_classifier(args, run, model, codes["train"], {"train_actions": actions})


@pytest.fixture
def episodes():
    g = torch.Generator().manual_seed(1)
    return {"train": torch.randint(0, 8, (2, 9, 21, 21), generator=g)}, torch.randint(0, 3, (2, 8), generator=g)


def reference_classifier(frames, actions, steps, seed, batch_size=64, lr=1e-3):
    """The action classifier as the script's own loop trained it before it moved to the one loop."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = video_eval.ActionClassifier(64)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    generator, (E, T) = torch.Generator().manual_seed(seed), actions.shape
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate(lr, "cooldown", step - 1, steps)
        i = torch.randint(E * T, (batch_size,), generator=generator)
        e, t = i // T, i % T
        pairs, target = torch.stack([frames[e, t], frames[e, t + 1]], 1), actions[e, t]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        flipped_pairs, flipped_target = video_eval.mirror(pairs, target)
        pairs = torch.where(flip[:, None, None, None, None], flipped_pairs, pairs)
        target = torch.where(flip, flipped_target, target)
        loss = F.cross_entropy(classifier(pairs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return classifier


def weights(classifier) -> dict:
    return {k: v.clone() for k, v in classifier.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_action_classifier_trains_in_the_one_loop_as_its_own_loop_did_and_is_cached(tmp_path, episodes, monkeypatch):
    """The same seeded draws, initial weights and cool-down as before the move to the one loop (the
    same weights, bit for bit); the checkpoint records what it was made from and is read back
    while that holds, leaving the global random state as it was; other steps, another seed or
    another VQ-VAE train a new one."""
    model, (codes, actions) = tiny_vqvae(), episodes
    run = a_run(tmp_path)
    state = torch.get_rng_state()
    trained = weights(action_classifier(run, model, codes, actions, steps=5, seed=3))
    assert torch.equal(torch.get_rng_state(), state)                         # the global stream untouched
    frames = video_data.to_uint8(video_data.decode_frames(model, codes["train"]))
    assert same_weights(trained, weights(reference_classifier(frames, actions, steps=5, seed=3)))
    saved = files.load_checkpoint(tmp_path / "action_classifier.pt")
    assert saved["step"] == 5 and saved["made_from"] == {"vqvae": run.vqvae_id, "episodes": guards.content_key(
        codes["train"], actions), "steps": 5, "seed": 3, **video_eval.ACTION_CLASSIFIER}
    assert run.histories["action_classifier"]["step"] == [2, 4, 5] and "action_classifier_seconds" in run.timings

    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("not read back"))
    again = action_classifier(a_run(tmp_path), model, codes, actions, steps=5, seed=3)
    assert same_weights(weights(again), trained) and not again.training
    monkeypatch.undo()
    other = a_run(tmp_path)
    other.vqvae_id = "step 2, sha256 fedcba9876543210"
    action_classifier(other, model, codes, actions, steps=4, seed=3)
    assert files.load_checkpoint(tmp_path / "action_classifier.pt")["made_from"]["vqvae"] == other.vqvae_id


def test_an_interrupted_action_classifier_resumes_to_the_same_weights(tmp_path, episodes, monkeypatch):
    """Stopped by Ctrl-C (its checkpoint saved), continued with --resume: the batches of the steps
    before are drawn again, so it ends as one trained in one go, checkpoints or not."""
    model, (codes, actions) = tiny_vqvae(), episodes
    whole = weights(action_classifier(a_run(tmp_path / "whole"), model, codes, actions, steps=7, seed=0))
    calls, mirror = [], video_eval.mirror

    def interrupting_mirror(*args):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return mirror(*args)
    monkeypatch.setattr(video_eval, "mirror", interrupting_mirror)
    with pytest.raises(SystemExit) as stopped:
        action_classifier(a_run(tmp_path / "cut", checkpoint_every=2), model, codes, actions, steps=7, seed=0)
    monkeypatch.undo()
    assert stopped.value.code == 130
    assert 2 <= files.load_checkpoint(tmp_path / "cut" / "action_classifier.pt")["step"] < 7
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        action_classifier(a_run(tmp_path / "cut"), model, codes, actions, steps=7, seed=0)
    resumed = action_classifier(a_run(tmp_path / "cut", resume=True), model, codes, actions, steps=7, seed=0)
    assert same_weights(weights(resumed), whole)


def test_the_action_classifier_of_a_torchrun_evaluation_trains_on_the_main_process_alone(tmp_path, episodes):
    """After end_training the process group is gone: a run of 2 processes must not wrap the
    classifier for data parallelism (DDP would need the group)."""
    model, (codes, actions) = tiny_vqvae(), episodes
    run = a_run(tmp_path)
    run.world_size = 2
    classifier = action_classifier(run, model, codes, actions, steps=2, seed=0)
    assert isinstance(classifier, video_eval.ActionClassifier) and run.world_size == 2


# ----------------------------------------------------------------------------- several seeds
def test_runs_of_several_seeds_are_summarized_by_their_mean_and_spread(tmp_path):
    runs = []
    for seed, (true, shuffled) in enumerate([(0.010, 0.014), (0.020, 0.018), (0.012, 0.016)]):
        runs.append(tmp_path / f"seed_{seed}")
        runs[-1].mkdir()
        mse = {"true_actions": true, "shuffled_actions": shuffled, "copy_last_frame": 0.015,
               "mean_of_draws_true_actions": true / 2, "mean_of_draws_shuffled_actions": 0.016 - seed / 1000}
        curves = {f"mse_per_step_{v}": [x * (1 + k / 10) for k in range(10)] for v, x in mse.items()}
        files.write_json(runs[-1] / "metrics.json", {
            "config": {"seed": seed}, "threads": 1, "curves": curves,
            "metrics": {**{f"mse_{v}": x for v, x in mse.items()},
                        "action_accuracy_real_test": 0.9, "action_accuracy_true_actions": 0.5 + seed / 10,
                        "action_accuracy_shuffled_actions": 0.4, "backend": "PyTorch"}})
    means = video_eval.summarize_seeds(tmp_path, runs)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["seeds"] == [0, 1, 2] and report["metrics"] == means
    assert means["mse_true_actions"] == pytest.approx(0.014) and "backend" not in means
    assert report["std"]["action_accuracy_true_actions"] == pytest.approx(np.std([0.5, 0.6, 0.7]))
    assert report["per_seed"]["mse_shuffled_actions"] == [0.014, 0.018, 0.016]
    assert report["true_actions_beat"] == {"shuffled_actions": [True, False, True], "copy_last_frame": [True, False, True]}
    assert report["mean_of_draws_true_actions_beat"] == {"mean_of_draws_shuffled_actions": [True, True, True],
                                                         "copy_last_frame": [True, True, True]}
    assert report["curves_max"]["mse_per_step_true_actions"][9] == pytest.approx(0.020 * 1.9)
    assert report["curves"]["mse_per_step_copy_last_frame"][0] == pytest.approx(0.015)
    assert (tmp_path / "error_curves.png").stat().st_size > 0
