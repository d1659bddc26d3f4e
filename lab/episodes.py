"""ViZDoom's first-person maze my_way_home in place of the paper's DeepMind Lab (Sec. 4.4): episodes
of a random agent, collected once and cached by their settings, the eval starts replayed in the
deterministic engine, and the frames as the frame VQ-VAE sees them.

The eval clips hold `given` real frames, then one frame per action of a continuation: the
functions here and in lab/video_eval.py read `given` off the shapes (clips of given + generated
frames, actions of generated steps), so the script that fixes the protocol states it once.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lab.cli import Progress
from lab.files import DataError, load_npz, save_npz
from lab.guards import check_writable
from lab.images import encode, pixel_variance

ACTIONS = ("forward", "turn_left", "turn_right")
SCRIPTS = ("forward", "turn_right", "random")   # the continuations generated in eval
FRAME_SIZE = 84                                 # the paper's DeepMind Lab frames


def _vizdoom():
    try:
        import vizdoom
    except ImportError:
        raise SystemExit("the video experiment needs ViZDoom, an optional dependency: pip install vizdoom==1.3.2 "
                         "(MIT; the wheel bundles the engine, the Freedoom data and the my_way_home scenario)") from None
    return vizdoom


class EpisodeEnded(Exception):
    """The agent reached the goal before the actions ran out."""


def rollout(seed: int, actions: np.ndarray, frame_skip: int) -> np.ndarray:
    """Play `actions` (indices into ACTIONS) in my_way_home from the start of the episode of `seed`.

    Returns the frames seen before each action and after the last: (len(actions) + 1, 84, 84, 3)
    uint8. The engine is deterministic: the same seed and actions give the same frames.
    Raises EpisodeEnded if the agent reaches the goal early.
    """
    vzd = _vizdoom()
    game = vzd.DoomGame()
    game.load_config(os.path.join(vzd.scenarios_path, "my_way_home.cfg"))
    game.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
    game.set_screen_format(vzd.ScreenFormat.RGB24)
    game.set_window_visible(False)
    game.set_sound_enabled(False)
    game.set_doom_config_path(os.path.join(tempfile.gettempdir(), "_vizdoom.ini"))  # not in the user's cwd
    game.set_available_buttons([vzd.Button.MOVE_FORWARD, vzd.Button.TURN_LEFT, vzd.Button.TURN_RIGHT])
    game.set_episode_timeout((len(actions) + 2) * frame_skip + 100)
    game.set_seed(seed)
    game.init()
    try:
        game.new_episode()
        frames, buttons = [], np.eye(len(ACTIONS), dtype=int).tolist()
        for i in range(len(actions) + 1):
            if game.is_episode_finished():
                raise EpisodeEnded(f"seed {seed}: the episode ended after {i} of {len(actions)} actions")
            frames.append(game.get_state().screen_buffer)
            if i < len(actions):
                game.make_action(buttons[actions[i]], frame_skip)
    finally:
        game.close()
    return resize(np.stack(frames))


def resize(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 84, 84, 3) uint8, antialiased (the 4:3 screen is squeezed, as in Atari work)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(FRAME_SIZE, FRAME_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())


def random_actions(seed: int, length: int, max_hold: int) -> np.ndarray:
    """The random agent: a uniformly drawn action held for 1..max_hold steps, again and again."""
    rng, actions = np.random.default_rng(seed), []
    while len(actions) < length:
        actions += [int(rng.integers(len(ACTIONS)))] * int(rng.integers(1, max_hold + 1))
    return np.array(actions[:length], dtype=np.int64)


def play_episodes(first_seed: int, count: int, length: int, max_hold: int, frame_skip: int):
    """`count` episodes of `length` actions (seeds from first_seed on; one whose agent reaches the
    goal early is replaced by the next seed): frames (E, T+1, 84, 84, 3) uint8, actions (E, T),
    seeds (E,)."""
    frames, actions, seeds, seed = [], [], [], first_seed
    progress = Progress("collect", count)
    while len(seeds) < count:
        a = random_actions(seed, length, max_hold)
        try:
            frames.append(rollout(seed, a, frame_skip))
            actions.append(a)
            seeds.append(seed)
            progress.update(len(seeds))
        except EpisodeEnded:
            pass
        seed += 1
    return np.stack(frames), np.stack(actions), np.array(seeds)


def eval_starts(test_actions: np.ndarray, test_seeds: np.ndarray, seed: int, frame_skip: int, given: int,
                generated: int) -> dict[str, np.ndarray]:
    """For each held-out episode, a start t0 and, per continuation in SCRIPTS, the given + generated
    true frames.

    The agent plays the episode's own actions up to frame t0 + given - 1, then `generated` steps of
    the script ("random" continues the episode's own actions); the engine replays it from the same
    seed. Returns frames (S, len(SCRIPTS), given + generated, 84, 84, 3) uint8, actions
    (S, len(SCRIPTS), generated) and the starts t0 (S,) and episodes (S,) they come from.
    """
    rng = np.random.default_rng(seed)
    frames, actions, starts, episodes = [], [], [], []
    for episode, (a, episode_seed) in enumerate(zip(test_actions, test_seeds)):
        t0 = int(rng.integers(0, len(a) - given - generated + 1))
        scripts = {"forward": np.full(generated, ACTIONS.index("forward")),
                   "turn_right": np.full(generated, ACTIONS.index("turn_right")),
                   "random": a[t0 + given - 1:t0 + given - 1 + generated]}
        per_script = []
        for name in SCRIPTS:
            played = np.concatenate([a[:t0 + given - 1], scripts[name]])
            try:
                per_script.append(rollout(int(episode_seed), played, frame_skip)[t0:])
            except EpisodeEnded:   # the scripted agent found the goal: skip this start
                break
        if len(per_script) == len(SCRIPTS):
            frames.append(np.stack(per_script))
            actions.append(np.stack([scripts[name] for name in SCRIPTS]))
            starts.append(t0)
            episodes.append(episode)
    if not frames:
        raise DataError(f"no eval start: in each of the {len(test_seeds)} held-out episodes a scripted agent "
                        "reached the goal; collect more held-out episodes")
    return {"frames": np.stack(frames), "actions": np.stack(actions), "t0": np.array(starts), "episode": np.array(episodes)}


def collect_episodes(data_dir: Path, episodes: int, test_episodes: int, episode_length: int, frame_skip: int,
                     max_hold: int, seed: int, given: int, generated: int) -> dict:
    """Training and held-out episodes of the random agent and the eval clips (eval_starts), played
    once and cached in data_dir by their settings, as torch tensors; with the training pixels'
    variance ("variance", of every 10th frame), the eval clips' actions shuffled between their
    continuations ("eval_shuffled_actions", shuffle_actions) and the seconds the collection took."""
    path = Path(data_dir) / (f"vizdoom_my_way_home_{episodes}+{test_episodes}x{episode_length}"
                             f"_skip{frame_skip}_hold{max_hold}_seed{seed}.npz")
    data = load_npz(path, keys=("train_frames", "test_frames", "eval_frames"))
    if data is None:
        check_writable(Path(data_dir))
    if data is None or data["eval_frames"].shape[2] != given + generated:
        t0 = time.perf_counter()
        print(f"collecting {episodes} + {test_episodes} episodes of {episode_length} actions "
              f"in my_way_home (frame skip {frame_skip}) -> {path}", flush=True)
        # Seeds of held-out episodes start far above those of training episodes.
        train_frames, train_actions, train_seeds = play_episodes(seed * 10_000_000, episodes, episode_length,
                                                                 max_hold, frame_skip)
        test_frames, test_actions, test_seeds = play_episodes(seed * 10_000_000 + 5_000_000, test_episodes,
                                                              episode_length, max_hold, frame_skip)
        starts = eval_starts(test_actions, test_seeds, seed, frame_skip, given, generated)
        data = dict(train_frames=train_frames, train_actions=train_actions, train_seeds=train_seeds,
                    test_frames=test_frames, test_actions=test_actions, test_seeds=test_seeds,
                    eval_frames=starts["frames"], eval_actions=starts["actions"], eval_t0=starts["t0"],
                    eval_episode=starts["episode"], collect_seconds=np.array(time.perf_counter() - t0))
        save_npz(path, data)
        print(f"collected {train_frames.shape[0] * train_frames.shape[1] + test_frames.shape[0] * test_frames.shape[1]} "
              f"frames in {float(data['collect_seconds']):.1f} s", flush=True)
    data = {k: torch.from_numpy(v) for k, v in data.items()}   # cached: every process reads one file
    data["collect_seconds"] = data["collect_seconds"].item()
    data["variance"] = pixel_variance(data["train_frames"][:, ::10])
    data["eval_shuffled_actions"] = shuffle_actions(data["eval_actions"])
    return data


def frames_to_float(frames_uint8: torch.Tensor, device) -> torch.Tensor:
    """uint8 (..., 84, 84, 3) -> float (..., 3, 84, 84) in [-0.5, 0.5], contiguous: the same memory
    layout whatever the frames' (convolutions round differently on channels-last tensors)."""
    return (frames_uint8.to(device).movedim(-1, -3).float() / 255 - 0.5).contiguous()


def encode_frames(model, frames: torch.Tensor, device, batch_size: int = 128) -> torch.Tensor:
    """Codes (..., 21, 21) int64 of frames (..., 84, 84, 3) uint8 (lab.images.encode)."""
    codes = encode(model, frames.reshape(-1, *frames.shape[-3:]), device, frames_to_float, batch_size)
    return codes.reshape(*frames.shape[:-3], *codes.shape[1:])


@torch.no_grad()
def decode_frames(model, codes: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Frames (..., 3, 84, 84) float in [0, 1] of codes (..., 21, 21)."""
    flat = codes.reshape(-1, *codes.shape[-2:])
    device = model.quantizer.codebook.device
    out = [model.decode(flat[i:i + batch_size].to(device)).cpu() + 0.5 for i in range(0, len(flat), batch_size)]
    return torch.cat(out).clamp(0, 1).reshape(*codes.shape[:-2], *out[0].shape[1:])


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [0, 1] -> uint8, as every frame the action classifier sees is stored."""
    return (frames * 255).round().clamp(0, 255).to(torch.uint8)


def shuffle_actions(actions: torch.Tensor) -> torch.Tensor:
    """Each sequence of actions (S, 3, 10) replaced by another continuation's of the same start:
    forward <- turn_right <- random <- forward."""
    return actions.roll(-1, dims=1)
