"""lab/episodes.py: repeatable collection in ViZDoom and its cache, the eval truth replayed in the
engine, and the frames as the model sees them."""
import sys

import numpy as np
import pytest
import torch

from lab import episodes
from lab import images

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def collect(data_dir):
    """Two training and two held-out episodes of 20 actions, and the eval clips of the paper's protocol."""
    return episodes.collect_episodes(data_dir, 2, 2, 20, frame_skip=4, max_hold=4, seed=0, given=6, generated=10)


def test_frames_reach_the_model_in_one_memory_layout_whether_fresh_or_cached():
    # Freshly collected frames were an (N, H, W, 3) view of (N, 3, H, W) memory and cached ones
    # (N, H, W, 3) memory: convolutions round differently on the two, so runs diverged.
    cached = torch.randint(0, 256, (4, 84, 84, 3), dtype=torch.uint8)
    fresh = cached.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    a, b = episodes.frames_to_float(cached, "cpu"), episodes.frames_to_float(fresh, "cpu")
    assert a.is_contiguous() and b.is_contiguous() and torch.equal(a, b)
    assert episodes.resize(np.zeros((2, 120, 160, 3), np.uint8)).flags["C_CONTIGUOUS"]


def test_missing_vizdoom_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vizdoom", None)
    with pytest.raises(SystemExit, match=r"pip install vizdoom==1\.3\.2"):
        episodes.rollout(0, np.zeros(3, dtype=np.int64), 4)


def test_rollouts_repeat_exactly_for_a_seed_and_differ_between_seeds(vizdoom):
    actions = episodes.random_actions(7, 30, max_hold=4)
    assert np.array_equal(actions, episodes.random_actions(7, 30, max_hold=4)) and set(actions) <= {0, 1, 2}
    frames = episodes.rollout(7, actions, frame_skip=4)
    assert frames.shape == (31, 84, 84, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, episodes.rollout(7, actions, frame_skip=4))
    assert not np.array_equal(frames[0], episodes.rollout(8, actions[:1], frame_skip=4)[0])
    turned = episodes.rollout(7, np.full(3, episodes.ACTIONS.index("turn_right")), frame_skip=4)
    assert not np.array_equal(turned[0], turned[-1])


def test_eval_truth_replays_the_held_out_episode_and_collection_is_cached(tmp_path, vizdoom, monkeypatch):
    data = collect(tmp_path)
    assert data["train_frames"].shape == (2, 21, 84, 84, 3) and data["train_actions"].shape == (2, 20)
    assert not set(data["train_seeds"].tolist()) & set(data["test_seeds"].tolist())
    S = len(data["eval_frames"])
    assert data["eval_frames"].shape == (S, 3, 16, 84, 84, 3) and S >= 1
    for s in range(S):
        e, t0 = data["eval_episode"][s], data["eval_t0"][s]
        episode = data["test_frames"][e, t0:t0 + 16]
        random = episodes.SCRIPTS.index("random")
        assert torch.equal(data["eval_frames"][s, random], episode)         # replayed from the seed
        assert torch.equal(data["eval_actions"][s, random], data["test_actions"][e, t0 + 5:t0 + 15])
        for v, name in enumerate(episodes.SCRIPTS[:2]):
            assert torch.equal(data["eval_frames"][s, v, :6], episode[:6])     # the same 6 given frames
            assert (data["eval_actions"][s, v] == episodes.ACTIONS.index(name)).all()
    assert torch.equal(data["eval_shuffled_actions"], episodes.shuffle_actions(data["eval_actions"]))
    assert data["variance"] == images.pixel_variance(data["train_frames"][:, ::10]) and data["collect_seconds"] > 0
    monkeypatch.setattr(episodes, "rollout", lambda *a: pytest.fail("the cache was not used"))
    again = collect(tmp_path)
    assert again.keys() == data.keys()
    assert all(torch.equal(again[k], data[k]) for k in data if isinstance(data[k], torch.Tensor))
