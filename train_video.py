"""The paper's video experiment (Sec. 4.4), in ViZDoom's first-person maze instead of DeepMind Lab.

Stages, each resumable: (1) collect: episodes of a random agent (each action held for a few
steps) in the scenario `my_way_home`, 84x84 RGB, seeded, repeatable and cached in --data-dir;
(2) vqvae: a frame VQ-VAE, 84x84x3 -> 21x21 codes with K = 512; (3) prior: the codes of frame t+1
given those of the frames before it and the action (vqvae.ActionConditionalPrior); (4) eval:
from 6 real frames of held-out episodes, 10 frames are generated in latent space (with
classifier-free guidance toward the action, --guidance) while the agent goes "forward",
"turn_right" or keeps its random actions, decoded only at the end, and compared per step with
the truth, replayed in the deterministic engine with the same seed: the model with
the true actions, with shuffled actions (another sequence's), and copying the last real frame; an
inverse-dynamics classifier, trained on real transitions passed through the VQ-VAE, says whether
the generated transitions show the action they were given. Everything lands in --out: vqvae.pt,
prior.pt, codes.pt, judge.pt (the classifier), metrics.json, *.png and *.gif; with --seeds, one
such folder per seed and their mean and spread.

    pip install vizdoom==1.3.2          # optional dependency: the engine, Freedoom and the scenarios
    python train_video.py               # quick preset: the whole pipeline on a CPU
    python train_video.py --seeds 0 1 2     # three runs, and their mean and spread
    python train_video.py --preset paper    # larger model, more data and steps: a GPU job
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import training
import vqvae

ACTIONS = ("forward", "turn_left", "turn_right")
SCRIPTS = ("forward", "turn_right", "random")   # the continuations generated in eval
FRAME_SIZE = 84                                 # the paper's DeepMind Lab frames
GIVEN, GENERATED = 6, 10                        # the paper's protocol: 6 real frames, then 10

# Each preset sets the defaults of the options below (named after the config fields); any option on
# the command line wins. What each costs and scores is measured in README.md and TUTORIAL.md.
PRESETS = {
    # The whole pipeline on a CPU: 9.6k training frames, a small frame VQ-VAE, and a prior whose
    # autoregressive part (441 passes per frame) is small, so that sampling the eval videos stays
    # affordable; sampled with guidance toward the action (not in the paper).
    "quick": dict(episodes=48, episode_length=200, test_episodes=16, hidden_channels=64, res_channels=32,
                  num_res_layers=2, embedding_dim=64, num_embeddings=512, decay=0.99, commitment_cost=0.25,
                  kmeans_init=True, dead_code_threshold=0.1, lr=1e-3, lr_schedule="constant", batch_size=16, steps=2000,
                  prior_context_frames=4, prior_channels=32, prior_num_layers=3, prior_context_channels=128,
                  prior_context_layers=4, prior_context_codebook=True, prior_steps=4500, prior_batch_size=16,
                  prior_lr=1e-3, prior_lr_schedule="cooldown", guidance=0.5, clf_steps=9000),
    # Sec. 4.4 gives 84x84 frames -> 21x21 codes with K = 512; the rest is not given.
    "paper": dict(episodes=1000, episode_length=500, test_episodes=32, hidden_channels=128, res_channels=64,
                  num_res_layers=2, embedding_dim=64, num_embeddings=512, decay=0.99, commitment_cost=0.25,
                  kmeans_init=False, dead_code_threshold=None, lr=3e-4, lr_schedule="constant", batch_size=64, steps=100_000,
                  prior_context_frames=4, prior_channels=128, prior_num_layers=8, prior_context_channels=256,
                  prior_context_layers=8, prior_context_codebook=True, prior_steps=200_000, prior_batch_size=64,
                  prior_lr=3e-4, prior_lr_schedule="constant", guidance=0.0, clf_steps=9000),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="quick",
                   help="quick (default): the whole pipeline on a CPU; paper: a larger model, more data and "
                        "steps (a GPU job)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where collected episodes are cached")
    training.add_run_arguments(p, "collect,vqvae,prior,eval", log_every=50, checkpoint_every=500)
    g = p.add_argument_group("environment (defaults from --preset)")
    g.add_argument("--episodes", type=int, help="training episodes")
    g.add_argument("--test-episodes", type=int, help="held-out episodes (other seeds); eval starts from each")
    g.add_argument("--episode-length", type=int, help="actions per episode")
    g.add_argument("--frame-skip", type=int, default=4, help="engine tics per action (a turn is 14 degrees at 4)")
    g.add_argument("--max-hold", type=int, default=4, help="the random agent holds each action 1..max-hold steps")
    g = p.add_argument_group("frame VQ-VAE (defaults from --preset)")
    training.add_encoder_arguments(g)
    training.add_codebook_arguments(g)
    training.add_optimizer_arguments(g, "frames per step")
    g = p.add_argument_group("action-conditional prior (defaults from --preset)")
    g.add_argument("--prior-context-frames", type=int, help=f"frames of codes the prior conditions on (<= {GIVEN})")
    training.add_prior_arguments(g)
    g.add_argument("--prior-lr-schedule", choices=training.LR_SCHEDULES,
                   help="as --lr-schedule, over --prior-steps")
    g.add_argument("--prior-context-channels", type=int, help="context network channels")
    g.add_argument("--prior-context-layers", type=int, help="context network residual blocks")
    g.add_argument("--prior-context-codebook", action=argparse.BooleanOptionalAction,
                   help="the context network reads the earlier frames as z_q (the VQ-VAE's codebook vectors) "
                        "instead of a learned embedding of their codes")
    g = p.add_argument_group("evaluation")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the prior")
    g.add_argument("--guidance", type=float,
                   help="classifier-free guidance of sampling: each code drawn from log p(z|a) + w (log p(z|a) - "
                        "log p(z)), p(z) the mean over actions; 0 samples the prior as it is")
    g.add_argument("--eval-draws", type=int, default=4,
                   help="continuations drawn per sequence: all are judged, the first is shown, their mean "
                        "estimates the model's prediction in pixel MSE (default 4)")
    g.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="run the pipeline once per seed (collection, training, sampling), each into <out>/seed_<N>, "
                        "then write their mean and spread to <out>/metrics.json and <out>/error_curves.png")
    g.add_argument("--clf-steps", type=int, help="steps of the inverse-dynamics classifier that names the action "
                                                 "between two frames (batch 64; defaults from --preset)")
    args = training.parse_with_presets(p, PRESETS, argv, "video")
    if not (np.isfinite(args.guidance) and args.guidance >= 0):
        p.error(f"--guidance: expected a finite number >= 0; got {args.guidance}")
    if not 1 <= args.prior_context_frames <= GIVEN:
        p.error(f"--prior-context-frames: expected 1..{GIVEN} (the given frames); got {args.prior_context_frames}")
    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds: expected distinct seeds; got {' '.join(map(str, args.seeds))}")
    if args.episode_length < GIVEN + GENERATED:
        p.error(f"--episode-length: expected at least {GIVEN + GENERATED}; got {args.episode_length}")
    return args


# ============================================================================ environment
def _vizdoom():
    try:
        import vizdoom
    except ImportError:
        raise SystemExit("train_video.py needs ViZDoom, an optional dependency: pip install vizdoom==1.3.2 "
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


def play_episodes(first_seed: int, count: int, args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` full-length episodes (seeds from first_seed on; one whose agent reaches the goal early
    is replaced by the next seed): frames (E, T+1, 84, 84, 3) uint8, actions (E, T), seeds (E,)."""
    frames, actions, seeds, seed = [], [], [], first_seed
    progress = training.Progress("collect", count)
    while len(seeds) < count:
        a = random_actions(seed, args.episode_length, args.max_hold)
        try:
            frames.append(rollout(seed, a, args.frame_skip))
            actions.append(a)
            seeds.append(seed)
            progress.update(len(seeds))
        except EpisodeEnded:
            pass
        seed += 1
    return np.stack(frames), np.stack(actions), np.array(seeds)


def eval_starts(test_actions: np.ndarray, test_seeds: np.ndarray, args) -> dict[str, np.ndarray]:
    """For each held-out episode, a start t0 and, per continuation in SCRIPTS, the 6 + 10 true frames.

    The agent plays the episode's own actions up to frame t0 + 5, then 10 steps of the script
    ("random" continues the episode's own actions); the engine replays it from the same seed.
    Returns frames (S, len(SCRIPTS), 16, 84, 84, 3) uint8, actions (S, len(SCRIPTS), 10) and the
    starts t0 (S,) and episodes (S,) they come from.
    """
    rng = np.random.default_rng(args.seed)
    frames, actions, starts, episodes = [], [], [], []
    for episode, (a, seed) in enumerate(zip(test_actions, test_seeds)):
        t0 = int(rng.integers(0, len(a) - GIVEN - GENERATED + 1))
        scripts = {"forward": np.full(GENERATED, ACTIONS.index("forward")),
                   "turn_right": np.full(GENERATED, ACTIONS.index("turn_right")),
                   "random": a[t0 + GIVEN - 1:t0 + GIVEN - 1 + GENERATED]}
        per_script = []
        for name in SCRIPTS:
            played = np.concatenate([a[:t0 + GIVEN - 1], scripts[name]])
            try:
                per_script.append(rollout(int(seed), played, args.frame_skip)[t0:])
            except EpisodeEnded:   # the scripted agent found the goal: skip this start
                break
        if len(per_script) == len(SCRIPTS):
            frames.append(np.stack(per_script))
            actions.append(np.stack([scripts[name] for name in SCRIPTS]))
            starts.append(t0)
            episodes.append(episode)
    return {"frames": np.stack(frames), "actions": np.stack(actions), "t0": np.array(starts), "episode": np.array(episodes)}


def collect(args) -> dict[str, np.ndarray]:
    """Training and held-out episodes and the eval continuations, cached by their settings."""
    name = (f"vizdoom_my_way_home_{args.episodes}+{args.test_episodes}x{args.episode_length}"
            f"_skip{args.frame_skip}_hold{args.max_hold}_seed{args.seed}.npz")
    path = args.data_dir / name
    data = training.load_npz(path, keys=("train_frames", "test_frames", "eval_frames"))
    if data is not None:
        return data
    t0 = time.perf_counter()
    print(f"collecting {args.episodes} + {args.test_episodes} episodes of {args.episode_length} actions "
          f"in my_way_home (frame skip {args.frame_skip}) -> {path}", flush=True)
    # Seeds of held-out episodes start far above those of training episodes.
    train_frames, train_actions, train_seeds = play_episodes(args.seed * 10_000_000, args.episodes, args)
    test_frames, test_actions, test_seeds = play_episodes(args.seed * 10_000_000 + 5_000_000, args.test_episodes, args)
    starts = eval_starts(test_actions, test_seeds, args)
    data = dict(train_frames=train_frames, train_actions=train_actions, train_seeds=train_seeds,
                test_frames=test_frames, test_actions=test_actions, test_seeds=test_seeds,
                eval_frames=starts["frames"], eval_actions=starts["actions"], eval_t0=starts["t0"],
                eval_episode=starts["episode"],
                collect_seconds=np.array(time.perf_counter() - t0))
    training.save_npz(path, data)
    print(f"collected {train_frames.shape[0] * train_frames.shape[1] + test_frames.shape[0] * test_frames.shape[1]} "
          f"frames in {float(data['collect_seconds']):.1f} s", flush=True)
    return data


def to_float(frames_uint8: torch.Tensor, device) -> torch.Tensor:
    """uint8 (..., 84, 84, 3) -> float (..., 3, 84, 84) in [-0.5, 0.5], contiguous: the same memory
    layout whatever the frames' (convolutions round differently on channels-last tensors)."""
    return (frames_uint8.to(device).movedim(-1, -3).float() / 255 - 0.5).contiguous()


# ============================================================================ stages
@torch.no_grad()
def encode(model, frames: torch.Tensor, device, batch_size: int = 128) -> torch.Tensor:
    """Codes (..., 21, 21) int64 of frames (..., 84, 84, 3) uint8."""
    flat = frames.reshape(-1, *frames.shape[-3:])
    codes = [model.quantize(model.encode(to_float(flat[i:i + batch_size], device))).indices.cpu()
             for i in range(0, len(flat), batch_size)]
    return torch.cat(codes).reshape(*frames.shape[:-3], *codes[0].shape[1:])


@torch.no_grad()
def decode(model, codes: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Frames (..., 3, 84, 84) float in [0, 1] of codes (..., 21, 21)."""
    flat = codes.reshape(-1, *codes.shape[-2:])
    device = model.quantizer.codebook.device
    out = [model.reconstruction(model.decode(flat[i:i + batch_size].to(device))).cpu() + 0.5
           for i in range(0, len(flat), batch_size)]
    return torch.cat(out).clamp(0, 1).reshape(*codes.shape[:-2], *out[0].shape[1:])


def transitions(num_episodes: int, episode_length: int, context_frames: int) -> torch.Tensor:
    """(episode, t) of every transition with a full context: frames t-F+1..t -> t+1 under action t."""
    e, t = torch.meshgrid(torch.arange(num_episodes), torch.arange(context_frames - 1, episode_length), indexing="ij")
    return torch.stack([e.flatten(), t.flatten()], 1)


def context_of(codes: torch.Tensor, e: torch.Tensor, t: torch.Tensor, context_frames: int) -> torch.Tensor:
    """Codes of frames t-F+1..t of episodes e: (B, F, 21, 21)."""
    return codes[e[:, None], t[:, None] + torch.arange(1 - context_frames, 1)]


def episode_codes(out: Path, env, model, vqvae_id, data) -> dict[str, torch.Tensor]:
    """Codes of every training and held-out frame, cached in <out>/codes.pt for this VQ-VAE
    (model_fingerprint) and these episodes (their seeds and lengths)."""
    path = out / "codes.pt"
    cached = training.load_checkpoint(path) if path.exists() else None
    episodes = {"train_seeds": data["train_seeds"], "test_seeds": data["test_seeds"],
                "frames_per_episode": data["train_frames"].shape[1]}
    if cached is not None and cached.get("vqvae_id") == vqvae_id and all(
            torch.equal(torch.as_tensor(cached.get(k, -1)), torch.as_tensor(v)) for k, v in episodes.items()):
        return cached
    codes = {"train": encode(model, data["train_frames"], env.device).to(torch.int16),
             "test": encode(model, data["test_frames"], env.device).to(torch.int16), "vqvae_id": vqvae_id,
             **episodes}
    if env.is_main:
        training.save_checkpoint(path, codes)
    return codes


def train_model(args, run: training.Run, env, train_frames: torch.Tensor, data_variance: float):
    """The VQ-VAE stage: Adam on seeded batches of every frame of the training episodes."""
    frames = train_frames.flatten(0, 1)

    def batch(step):
        return to_float(frames[training.batch_indices(step, len(frames), args.batch_size, args.seed, env)], env.device)

    config = training.config_from_args(vqvae.VQVAEConfig, args, in_channels=3, data_variance=data_variance)
    return training.train_vqvae(config, batch, args.lr, args.steps, run, env, args.lr_schedule)


def train_prior(args, run: training.Run, env, model, vqvae_id, codes, actions):
    """codes: (E, T+1, 21, 21) of the training episodes; actions (E, T)."""
    if (run.out / "prior.pt").exists():
        training.check_prior_matches(training.load_checkpoint(run.out / "prior.pt"), vqvae_id)
    config = training.config_from_args(vqvae.ActionConditionalPriorConfig, args, "prior_",
                                       num_embeddings=model.config.num_embeddings, num_actions=len(ACTIONS),
                                       codebook_dim=model.config.embedding_dim if args.prior_context_codebook else 0)
    prior = vqvae.ActionConditionalPrior(config).to(env.device)
    if config.codebook_dim:
        prior.set_codebook(model.quantizer.codebook)
    optimizer = torch.optim.Adam(prior.parameters(), lr=args.prior_lr)
    pairs = transitions(len(codes), actions.shape[1], config.context_frames)
    codes = codes.long()

    def loss_fn(ddp, step):
        training.set_learning_rate(optimizer, args.prior_lr, args.prior_lr_schedule, step, args.prior_steps)
        e, t = pairs[training.batch_indices(step, len(pairs), args.prior_batch_size, args.seed + 1, env)].unbind(1)
        logits = ddp(codes[e, t + 1].to(env.device), context_of(codes, e, t, config.context_frames).to(env.device),
                     actions[e, t].to(env.device))
        loss = F.cross_entropy(logits, codes[e, t + 1].to(env.device))   # nats per latent
        return loss, {"prior_loss": loss.detach()}

    history = training.run_loop("prior", prior, optimizer, loss_fn, args.prior_steps, run, env, {"vqvae_id": vqvae_id})
    return prior, history


@torch.no_grad()
def prior_test_nats(prior, codes: torch.Tensor, actions: torch.Tensor, device, batch_size: int = 64) -> dict[str, float]:
    """Teacher-forced -log p(z_t+1 | context, a_t) per latent on held-out episodes, with the true
    actions and with the actions of a random permutation of the transitions."""
    pairs = transitions(len(codes), actions.shape[1], prior.context_frames)
    codes = codes.long()
    shuffled = actions.flatten()[torch.randperm(actions.numel(), generator=torch.Generator().manual_seed(0))]
    shuffled = shuffled.reshape(actions.shape)
    totals = {"prior_test_nats_per_latent": 0.0, "prior_test_nats_per_latent_shuffled_actions": 0.0}
    for i in range(0, len(pairs), batch_size):
        e, t = pairs[i:i + batch_size].unbind(1)
        target, context = codes[e, t + 1].to(device), context_of(codes, e, t, prior.context_frames).to(device)
        for key, acts in zip(totals, (actions, shuffled)):
            totals[key] -= prior.log_prob(target, context, acts[e, t].to(device)).sum().item()
    return {k: v / (len(pairs) * codes[0, 0].numel()) for k, v in totals.items()}


@torch.no_grad()
def evaluate(args, env, model, prior, data, codes, data_variance: float) -> tuple[dict, dict]:
    """Test-set numbers: the frame VQ-VAE's (reconstruction error, code usage), the prior's
    teacher-forced nats on the held-out episodes, and those of the generated videos (evaluate_video).
    Returns (metrics, videos)."""
    prior.eval()
    recon = decode(model, codes["test"].long())
    mse = ((recon - data["test_frames"].movedim(-1, -3).float() / 255) ** 2).mean().item()
    metrics = training.image_metrics(mse, data_variance, codes["test"], model.config.num_embeddings)
    metrics.update(prior_test_nats(prior, codes["test"], data["test_actions"], env.device))
    video_metrics, videos = evaluate_video(args, env, model, prior, data)
    metrics.update(video_metrics)
    metrics.update(action_following(args, env, model, data, codes, videos))
    return metrics, videos


@torch.no_grad()
def evaluate_video(args, env, model, prior, data) -> tuple[dict, dict]:
    """Generate 10 frames from 6 real ones per held-out start and continuation; compare with the truth.

    Returns (metrics, videos): per-step mean squared error (pixels in [0, 1]) and code accuracy of
    the model with the true actions, with shuffled actions (each sequence takes another
    continuation's actions: forward <- turn_right <- random <- forward), and of copying the last
    real frame; the VQ-VAE's reconstruction of the truth is the floor of what codes can reach.
    The videos are draw 0 of sample_continuations, and "draws_..." all N of them (uint8, for the
    judge); the mean of the draws ("mean_of_draws_...") estimates the model's mean prediction, the
    one that minimises the expected pixel MSE: a single draw x~ of an exact model costs
    E|x~ - x|^2 = 2 tr Var(x | past), the mean of N draws tr Var (1 + 1/N).
    """
    frames, actions = data["eval_frames"], data["eval_actions"]         # (S, 3, 16, 84, 84, 3), (S, 3, 10)
    codes = encode(model, frames, env.device)                            # (S, 3, 16, 21, 21)
    draws = sample_continuations(args, env, prior, codes, actions)
    videos = {"truth": frames.movedim(-1, -3).float() / 255,
              "vqvae_reconstruction": decode(model, codes[:, :, GIVEN:])}
    for name, z in draws.items():
        decoded = torch.stack([decode(model, z_k) for z_k in z])
        videos[name], videos[f"mean_of_draws_{name}"] = decoded[0], decoded.mean(0)
        videos[f"draws_{name}"] = to_uint8(decoded)                      # for the judge: every draw
    generated = {name: z[0] for name, z in draws.items()}
    return video_metrics(frames, codes, generated, videos), videos


def shuffle_actions(actions: torch.Tensor) -> torch.Tensor:
    """Each sequence of actions (S, 3, 10) replaced by another continuation's of the same start:
    forward <- turn_right <- random <- forward."""
    return actions.roll(-1, dims=1)


@torch.no_grad()
def sample_continuations(args, env, prior, codes: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
    """The codes (N, S, 3, 10, 21, 21) of N = --eval-draws continuations the prior samples after
    the GIVEN real frames of codes (S, 3, 16, 21, 21), with the true actions (S, 3, 10) and with
    shuffled ones (each sequence takes the next continuation's actions), from one random stream
    seeded by --seed: draw 0 with either, then draw 1, and so on."""
    S, V = actions.shape[:2]
    context = codes[:, :, GIVEN - args.prior_context_frames:GIVEN].flatten(0, 1).to(env.device)
    commanded = {"true_actions": actions, "shuffled_actions": shuffle_actions(actions)}
    gen = torch.Generator(device=env.device).manual_seed(args.seed)
    generated = {name: [] for name in commanded}
    for draw in range(1, args.eval_draws + 1):
        t0 = time.perf_counter()
        for name, acts in commanded.items():
            z = prior.sample(context, acts.flatten(0, 1).to(env.device), generator=gen, temperature=args.temperature,
                             guidance=args.guidance)
            generated[name].append(z.cpu().reshape(S, V, GENERATED, *z.shape[-2:]))
        print(f"[eval] draw {draw}/{args.eval_draws}: {S * V} x {GENERATED} frames of codes with the true actions "
              f"and as many with shuffled ones in {time.perf_counter() - t0:.0f} s", flush=True)
    return {name: torch.stack(z) for name, z in generated.items()}


# What the model predicts: one draw with the true and with shuffled actions, and the mean of the draws.
MODEL_PREDICTIONS = ("true_actions", "shuffled_actions", "mean_of_draws_true_actions", "mean_of_draws_shuffled_actions")


def mse_per_step(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean squared error (GENERATED,) per generated step of videos (S, 3, 10, 3, 84, 84)."""
    return ((x - truth) ** 2).mean((0, 1, 3, 4, 5))


def video_metrics(frames, codes, generated: dict, videos: dict) -> dict:
    """The numbers of evaluate_video from the true frames (S, 3, 16, 84, 84, 3) uint8 and their
    codes, the generated codes and the decoded videos: curves per step and their means."""
    S, V = frames.shape[:2]
    truth = frames[:, :, GIVEN:].movedim(-1, -3).float() / 255          # (S, 3, 10, 3, 84, 84)
    truth_codes = codes[:, :, GIVEN:]
    last = frames[:, :, GIVEN - 1:GIVEN].movedim(-1, -3).float() / 255
    mse = {name: mse_per_step(videos[name], truth) for name in MODEL_PREDICTIONS}
    mse.update({"copy_last_frame": mse_per_step(last.expand_as(truth), truth),
                "vqvae_reconstruction": mse_per_step(videos["vqvae_reconstruction"], truth)})
    code_acc = {name: (z == truth_codes).float().mean((0, 1, 3, 4)) for name, z in generated.items()}
    code_acc["copy_last_frame"] = (codes[:, :, GIVEN - 1:GIVEN] == truth_codes).float().mean((0, 1, 3, 4))
    metrics = {"eval_starts": S, "eval_sequences": S * V}
    for name, curve in mse.items():
        metrics[f"mse_{name}"] = curve.mean().item()
        metrics[f"mse_per_step_{name}"] = curve.tolist()
    for name, curve in code_acc.items():
        metrics[f"code_accuracy_{name}"] = curve.mean().item()
        metrics[f"code_accuracy_per_step_{name}"] = curve.tolist()
    for name in SCRIPTS:   # per continuation, mean over the 10 steps
        v = SCRIPTS.index(name)
        for variant in MODEL_PREDICTIONS:
            metrics[f"mse_{name}_{variant}"] = ((videos[variant][:, v] - truth[:, v]) ** 2).mean().item()
        metrics[f"mse_{name}_copy_last_frame"] = ((last[:, v] - truth[:, v]) ** 2).mean().item()
    return metrics


# ============================================================================ does the video follow the action?
# An inverse-dynamics classifier names the action between two consecutive frames. It is trained on
# real transitions passed through the VQ-VAE (decoded from their codes), so that it sees the image
# statistics of generated frames, and then asked which action each generated transition shows.
def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [0, 1] -> uint8, as every frame the classifier sees is stored."""
    return (frames * 255).round().clamp(0, 255).to(torch.uint8)


class InverseDynamics(nn.Module):
    """Logits (B, len(ACTIONS)) of the action that took frame x_t to x_t+1, from pairs
    (B, 2, 3, 84, 84) uint8.

    It reads a cost volume, as optical-flow networks do: for each horizontal shift s of up to
    max_shift pixels (a turn moves the view about 11) and each vertical shift of up to
    max_vertical_shift (going forward moves the floor and the ceiling apart), the squared
    difference between x_t+1 and x_t shifted by s, averaged over cells of 4x4 pixels and normalised
    per cell. A small CNN keeps where in the frame each motion is, for a turn moves the whole view
    one way, while going forward spreads the two halves apart.
    """

    max_shift, max_vertical_shift = 16, 8

    def __init__(self, channels: int):
        super().__init__()
        c, shifts = channels, 2 * (self.max_shift + self.max_vertical_shift + 1)
        self.net = nn.Sequential(nn.Conv2d(shifts, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, c, 3, 2, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d((2, 4)), nn.Flatten(), nn.Linear(8 * c, len(ACTIONS)))

    def cost_volume(self, pairs: torch.Tensor) -> torch.Tensor:
        """(B, 2 max_shift + 1 + 2 max_vertical_shift + 1, H/4, W/4): how well x_t shifted by s
        pixels matches x_t+1, per cell; the horizontal shifts -max_shift..max_shift first, then
        the vertical ones."""
        gray = pairs.float().mean(2) / 255                                   # (B, 2, H, W)
        return torch.cat([shift_costs(gray, self.max_shift, -1), shift_costs(gray, self.max_vertical_shift, -2)], 1)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net(self.cost_volume(pairs))


def shift_costs(gray: torch.Tensor, max_shift: int, dim: int) -> torch.Tensor:
    """(B, 2 max_shift + 1, H/4, W/4) of grayscale pairs (B, 2, H, W): for s = -max_shift..max_shift,
    the mean over 4x4 cells of (x_t+1[i] - x_t[i + s])^2 along dim (-1: x, -2: y), x_t extended by
    its edge, divided per cell by the mean over s."""
    size, m = gray.shape[dim], max_shift
    before = F.pad(gray[:, :1], (m, m, 0, 0) if dim == -1 else (0, 0, m, m), mode="replicate")
    cost = torch.cat([F.avg_pool2d((before.narrow(dim, m + s, size) - gray[:, 1:]) ** 2, 4)
                      for s in range(-m, m + 1)], 1)
    return cost / (cost.mean(1, keepdim=True) + 1e-3)


def frame_pairs(frames: torch.Tensor) -> torch.Tensor:
    """Consecutive frames (..., T+1, 3, H, W) -> the T pairs (x_t, x_t+1): (..., T, 2, 3, H, W)."""
    return torch.stack([frames[..., :-1, :, :, :], frames[..., 1:, :, :, :]], -4)


# The mirror image of a transition is one of the mirrored maze: `forward` stays forward and the
# turns swap. The judge trains on both, so that it must tell a turn by the way the view moves.
MIRRORED = torch.tensor([ACTIONS.index(a.replace("left", "?").replace("right", "left").replace("?", "right"))
                         for a in ACTIONS])


def mirror(pairs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (..., 2, 3, H, W) flipped left to right, and their actions (...) with the turns swapped."""
    return pairs.flip(-1), MIRRORED[actions]


# How the judge is trained besides its steps and seed: part of its cache key (cached_judge).
JUDGE = dict(channels=64, batch_size=64, lr=1e-3, max_shift=InverseDynamics.max_shift,
             max_vertical_shift=InverseDynamics.max_vertical_shift)


@torch.enable_grad()   # evaluation runs under no_grad
def train_action_classifier(frames: torch.Tensor, actions: torch.Tensor, steps: int, seed: int, device,
                            batch_size: int = JUDGE["batch_size"], lr: float = JUDGE["lr"]) -> InverseDynamics:
    """Adam on seeded batches of every transition of frames (E, T+1, 3, 84, 84) uint8 under actions
    (E, T), each mirrored (mirror) with probability 1/2, the learning rate cooled down linearly
    over the last 20% of steps."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = InverseDynamics(JUDGE["channels"]).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    generator, (E, T) = torch.Generator().manual_seed(seed), actions.shape
    progress = training.Progress("classifier", steps)
    for step in range(1, steps + 1):
        training.set_learning_rate(optimizer, lr, "cooldown", step - 1, steps)
        i = torch.randint(E * T, (batch_size,), generator=generator)
        e, t = i // T, i % T
        pairs, target = torch.stack([frames[e, t], frames[e, t + 1]], 1), actions[e, t]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        flipped_pairs, flipped_target = mirror(pairs, target)
        pairs = torch.where(flip[:, None, None, None, None], flipped_pairs, pairs)
        target = torch.where(flip, flipped_target, target)
        loss = F.cross_entropy(classifier(pairs.to(device)), target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.update(step, loss=loss.item())
    return classifier.eval()


@torch.no_grad()
def predict_actions(classifier: InverseDynamics, pairs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The classifier's action (...) for pairs (..., 2, 3, 84, 84) uint8."""
    flat = pairs.reshape(-1, *pairs.shape[-4:])
    device = next(classifier.parameters()).device
    out = [classifier(flat[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(flat), batch_size)]
    return torch.cat(out).reshape(pairs.shape[:-4])


def cached_judge(args, env, model, data, codes) -> InverseDynamics:
    """The classifier trained on the training episodes' frames decoded from their codes, cached in
    <out>/judge.pt for what it is made from: the VQ-VAE and the episodes (those of the codes),
    --clf-steps, --seed and JUDGE. It does not depend on the prior, so an evaluation of another
    prior or sampler (--guidance, --eval-draws, a new prior stage) judges with the same one."""
    path = args.out / "judge.pt"
    made_from = {"vqvae_id": codes["vqvae_id"], "train_seeds": torch.as_tensor(codes["train_seeds"]).tolist(),
                 "frames_per_episode": int(codes["frames_per_episode"]), "steps": args.clf_steps, "seed": args.seed,
                 **JUDGE}
    cached = training.load_checkpoint(path) if path.exists() else None
    if cached is not None and cached.get("made_from") == made_from:
        classifier = InverseDynamics(JUDGE["channels"]).to(env.device)
        classifier.load_state_dict(cached["model"])
        print(f"[eval] action classifier read from {path}", flush=True)
        return classifier.eval()
    classifier = train_action_classifier(to_uint8(decode(model, codes["train"].long())), data["train_actions"],
                                         args.clf_steps, args.seed, env.device)
    training.save_checkpoint(path, {"model": classifier.state_dict(), "made_from": made_from})
    return classifier


@torch.no_grad()
def action_following(args, env, model, data, codes, videos: dict) -> dict:
    """Score the classifier (cached_judge; action_accuracies) on the held-out episodes and the eval
    videos, all decoded from their codes."""
    t0 = time.perf_counter()
    classifier = cached_judge(args, env, model, data, codes)
    last = decode(model, encode(model, data["eval_frames"][:, :, GIVEN - 1:GIVEN], env.device))
    metrics = action_accuracies(classifier, to_uint8(decode(model, codes["test"].long())), data["test_actions"],
                                last, videos, data["eval_actions"])
    print(f"[eval] action classifier trained and applied in {time.perf_counter() - t0:.0f} s: "
          f"real held-out {metrics['action_accuracy_real_test']:.1%}, generated with true actions "
          f"{metrics['action_accuracy_true_actions']:.1%}, with shuffled {metrics['action_accuracy_shuffled_actions']:.1%}",
          flush=True)
    return metrics


def action_accuracies(classifier, test_frames: torch.Tensor, test_actions: torch.Tensor, last: torch.Tensor,
                      videos: dict, actions: torch.Tensor) -> dict:
    """How often the classifier names the commanded action.

    On every transition of held-out episodes, frames (E, T+1, 3, 84, 84) uint8 under test_actions
    (E, T); and on the eval videos (S, 3, 10, 3, 84, 84) in [0, 1], from the last real frame `last`
    (S, 3, 1, 3, 84, 84) on: the VQ-VAE reconstruction of the truth and the videos generated with
    the true actions (S, 3, 10), both scored against those, and with shuffled actions, scored
    against the shuffled actions they were given. A generated variant is scored on every draw
    (videos["draws_" + variant], (N, S, 3, 10, 3, 84, 84) uint8) where there are several. Returns
    the accuracies overall, per continuation and per generated step.
    """
    metrics = {"action_accuracy_real_test":
               (predict_actions(classifier, frame_pairs(test_frames)) == test_actions).float().mean().item()}
    commanded = {"vqvae_reconstruction": actions, "true_actions": actions, "shuffled_actions": shuffle_actions(actions)}
    start = to_uint8(last)
    for variant, acts in commanded.items():
        clips = videos[f"draws_{variant}"] if f"draws_{variant}" in videos else to_uint8(videos[variant])[None]
        pairs = frame_pairs(torch.cat([start.expand(len(clips), *start.shape), clips], 3))
        correct = (predict_actions(classifier, pairs) == acts).float()             # (N, S, 3, 10)
        metrics[f"action_accuracy_{variant}"] = correct.mean().item()
        metrics[f"action_accuracy_per_step_{variant}"] = correct.mean((0, 1, 2)).tolist()
        for v, name in enumerate(SCRIPTS):
            metrics[f"action_accuracy_{name}_{variant}"] = correct[:, :, v].mean().item()
    return metrics


# ============================================================================ figures
def plot_error_curves(path: Path, curves: dict, bands: dict | None = None, title: str = "") -> None:
    """Per generated step: pixel MSE, code accuracy and action accuracy of each variant; `bands`
    (the same keys) holds a (low, high) pair of curves to shade, e.g. the range over seeds."""
    plt = training.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    steps = range(1, GENERATED + 1)
    panels = (("mse_per_step", "pixel MSE to the true frame (lower is better)"),
              ("code_accuracy_per_step", "codes equal to those of the true frame"),
              ("action_accuracy_per_step", "transitions the classifier names as commanded"))
    for ax, (panel, panel_title) in zip(axes, panels):
        for color, name, style in ((0, "true_actions", "-o"), (1, "shuffled_actions", "-o"),
                                   (0, "mean_of_draws_true_actions", "--"), (1, "mean_of_draws_shuffled_actions", "--"),
                                   (2, "copy_last_frame", "-o"), (3, "vqvae_reconstruction", ":")):
            key = f"{panel}_{name}"
            if key in curves:
                ax.plot(steps, curves[key], style, ms=3, color=f"C{color}", label=name.replace("_", " "))
                if bands:
                    ax.fill_between(steps, *bands[key], color=f"C{color}", alpha=0.2, lw=0)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("generated step")
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_strips(out: Path, videos: dict, num_starts: int = 3) -> None:
    """Per continuation, a PNG strip: rows of 16 frames (6 real + 10 true / generated) per start."""
    for v, name in enumerate(SCRIPTS[:2]):
        rows = []
        for s in range(min(num_starts, len(videos["truth"]))):
            given = videos["truth"][s, v, :GIVEN]
            rows += [(f"{s}: truth", videos["truth"][s, v]),
                     (f"{s}: generated", torch.cat([given, videos["true_actions"][s, v]])),
                     (f"{s}: shuffled actions", torch.cat([given, videos["shuffled_actions"][s, v]]))]
        training.save_image_rows(out / f"video_{name}.png", rows,
                                 f'"{name}": {GIVEN} real frames, then {GENERATED} generated in latent space '
                                 '(red line: where the real frames end)', divider=GIVEN)


def side_by_side(videos: torch.Tensor) -> torch.Tensor:
    """Videos (n, T, 3, H, W) -> one video (T, 3, H, n W), the n placed left to right."""
    return torch.cat(list(videos.unbind(0)), -1)


def save_gif(path: Path, videos: dict, v: int, num_starts: int = 4) -> None:
    """An animated GIF: for a few starts side by side, the truth above and the generated frames below."""
    from PIL import Image   # a dependency of matplotlib
    n = min(num_starts, len(videos["truth"]))
    given = videos["truth"][:n, v, :GIVEN]
    top = videos["truth"][:n, v]
    bottom = torch.cat([given, videos["true_actions"][:n, v]], 1)
    grid = torch.cat([side_by_side(top), side_by_side(bottom)], -2)     # (16, 3, 2H, n W)
    images = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).quantize(
        64, dither=Image.Dither.NONE) for f in grid]   # undithered: noisy textures make GIFs large
    images[0].save(path, save_all=True, append_images=images[1:], duration=300, loop=0, optimize=True)


def make_figures(out: Path, env, model, data, test_codes, metrics, videos, histories) -> None:
    frames = data["test_frames"][:2, ::25].flatten(0, 1)[:12]
    recon = decode(model, encode(model, frames, env.device))
    training.save_image_rows(out / "reconstructions.png", [("original", frames.movedim(-1, -3).float() / 255),
                                                           ("reconstruction", recon)],
                             "held-out frames and their reconstructions (84x84 -> 21x21 codes)")
    counts = torch.bincount(test_codes.long().flatten(), minlength=model.config.num_embeddings)
    training.plot_code_usage(out / "codebook_usage.png", counts, "held-out frames' code usage:")
    training.plot_history(out / "vqvae_curves.png", histories["vqvae"], ["loss", "recon_loss", "perplexity"],
                          "frame VQ-VAE training")
    training.plot_history(out / "prior_curves.png", histories["prior"], ["prior_loss"], "prior (nats per latent)")
    plot_error_curves(out / "error_curves.png", metrics)
    save_strips(out, videos)
    for v, name in enumerate(SCRIPTS[:2]):
        save_gif(out / f"video_{name}.gif", videos, v)


# ============================================================================ several seeds
def summarize(out: Path, runs: list[Path]) -> dict:
    """The mean and spread of the evaluations of runs (their metrics.json) of other seeds.

    Writes <out>/metrics.json (per metric: the mean, the standard deviation over runs and each
    run's value; per curve: the mean, minimum and maximum; per run, whether the true actions beat
    shuffled ones and copying the last frame in pixel MSE) and <out>/error_curves.png (the mean
    curves, the range over runs shaded). Returns the means.
    """
    reports = [json.loads((r / "metrics.json").read_text()) for r in runs]
    values = {k: [r["metrics"][k] for r in reports] for k, v in reports[0]["metrics"].items()
              if isinstance(v, (int, float))}
    curves = {k: np.array([r["curves"][k] for r in reports]) for k in reports[0]["curves"]}
    means = {k: float(np.mean(v)) for k, v in values.items()}
    seeds = [r["config"]["seed"] for r in reports]
    training.write_json(out / "metrics.json", {
        "seeds": seeds, "runs": [str(r) for r in runs], "threads": [r.get("threads") for r in reports],
        "metrics": means, "std": {k: float(np.std(v)) for k, v in values.items()}, "per_seed": values,
        "curves": {k: c.mean(0).tolist() for k, c in curves.items()},
        "curves_min": {k: c.min(0).tolist() for k, c in curves.items()},
        "curves_max": {k: c.max(0).tolist() for k, c in curves.items()},
        "true_actions_beat": beats(values, "true_actions", "shuffled_actions"),
        "mean_of_draws_true_actions_beat": beats(values, "mean_of_draws_true_actions", "mean_of_draws_shuffled_actions")})
    plot_error_curves(out / "error_curves.png", {k: c.mean(0) for k, c in curves.items()},
                      {k: (c.min(0), c.max(0)) for k, c in curves.items()},
                      f"mean over seeds {', '.join(map(str, seeds))}; shaded: their range")
    shown = ("mse_true_actions", "mse_shuffled_actions", "mse_mean_of_draws_true_actions",
             "mse_mean_of_draws_shuffled_actions", "mse_copy_last_frame", "action_accuracy_real_test",
             "action_accuracy_true_actions", "action_accuracy_shuffled_actions")
    print(f"over seeds {seeds}: " + ", ".join(f"{k} {means[k]:.4g} +- {np.std(values[k]):.2g}" for k in shown),
          flush=True)
    return means


def beats(values: dict, true: str, shuffled: str) -> dict:
    """Per run, whether the prediction `true` has a lower pixel MSE than `shuffled` and than copying."""
    return {other: [a < b for a, b in zip(values[f"mse_{true}"], values[f"mse_{other}"])]
            for other in (shuffled, "copy_last_frame")}


# ============================================================================ main
def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.seeds:
        return run_pipeline(args)
    runs = [args.out / f"seed_{seed}" for seed in args.seeds]
    for seed, out in zip(args.seeds, runs):
        print(f"=== seed {seed}: {out}", flush=True)
        run_pipeline(argparse.Namespace(**{**vars(args), "seed": seed, "out": out, "seeds": None}))
    if int(os.environ.get("RANK", "0")) == 0 and "eval" in args.stages:
        summarize(args.out, runs)


def run_pipeline(args: argparse.Namespace) -> None:
    """The stages of one run, as --stages asks, into args.out."""
    run, env = training.start(args)
    t0, histories, timings = time.perf_counter(), {}, {}
    data = {k: torch.from_numpy(v) for k, v in collect(args).items()}   # cached: every process reads one file
    timings["collect_seconds"] = data.pop("collect_seconds").item()
    train_frames = data["train_frames"]
    data_variance = training.pixel_variance(train_frames[:, ::10])
    if env.is_main:
        print(f"my_way_home: {train_frames.shape[0]} x {train_frames.shape[1]} training frames, "
              f"{len(data['test_frames'])} held-out episodes, {len(data['eval_frames'])} eval starts; "
              f"preset {args.preset}; device {env.device} x {env.world_size}; "
              f"quantizer {vqvae.quantizer_backend(env.device)}; out {args.out}", flush=True)

    if "vqvae" in args.stages:
        t1 = time.perf_counter()
        model, histories["vqvae"] = train_model(args, run, env, train_frames, data_variance)
        if histories["vqvae"] is None:
            training.stopped()
        timings["vqvae_seconds"] = time.perf_counter() - t1
    if not {"prior", "eval"} & args.stages:
        return training.teardown()
    model, state = training.load_model(args.out / "vqvae.pt", env.device)
    histories["vqvae"], vqvae_id = state["history"], training.model_fingerprint(state)
    codes = episode_codes(run.out, env, model, vqvae_id, data)

    if "prior" in args.stages:
        t1 = time.perf_counter()
        prior, histories["prior"] = train_prior(args, run, env, model, vqvae_id, codes["train"], data["train_actions"])
        if histories["prior"] is None:
            training.stopped()
        timings["prior_seconds"] = time.perf_counter() - t1
    elif "eval" in args.stages:
        prior, histories["prior"] = training.load_prior(args.out / "prior.pt", vqvae_id, env.device)

    training.teardown()  # the main process evaluates alone
    if "eval" in args.stages and env.is_main:
        t1 = time.perf_counter()
        metrics, videos = evaluate(args, env, model, prior, data, codes, data_variance)
        make_figures(run.out, env, model, data, codes["test"], metrics, videos, histories)
        timings["eval_seconds"] = time.perf_counter() - t1
        shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        training.write_report(run, shown, model.config, time.perf_counter() - t0, timings, env,
                              curves={k: v for k, v in metrics.items() if isinstance(v, list)},
                              prior_config=dataclasses.asdict(prior.config))


if __name__ == "__main__":
    training.run_main(main)
