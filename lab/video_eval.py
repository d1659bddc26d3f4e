"""What the video experiment measures and draws: per-step errors of generated continuations
against the truth; an action classifier that says whether a generated transition shows the action
it was given (trained by train_video.py's action_classifier stage); the figures; and the mean and
spread of the runs of several seeds."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lab.episodes import ACTIONS, SCRIPTS, decode_frames, encode_frames, shuffle_actions, to_uint8
from lab.figures import plot_code_usage, plot_history, pyplot, save, save_image_rows
from lab.files import load_checkpoint, write_atomically, write_json
from lab.guards import content_key
from lab.images import image_metrics


# What the model predicts: one draw with the true and with shuffled actions, and the mean of the draws.
MODEL_PREDICTIONS = ("true_actions", "shuffled_actions", "mean_of_draws_true_actions", "mean_of_draws_shuffled_actions")


@torch.no_grad()
def evaluate_videos(model, classifier, data: dict, codes: dict, draws: dict, device):
    """Test-set numbers of the frame VQ-VAE (reconstruction error and code usage of the held-out
    episodes) and of the continuations that a prior generated from the eval clips.

    codes: "test" (E, T+1, 21, 21) of the held-out episodes and "eval" (S, 3, given + generated,
    21, 21) of the eval clips; draws: {"true_actions", "shuffled_actions"} codes (N, S, 3, generated, 21, 21) of N
    draws; classifier: the action classifier (train_video.py's action_classifier stage). Returns
    (metrics, videos): video_metrics and action_following, and the videos in [0, 1]
    (S, 3, T, 3, 84, 84): "truth", "vqvae_reconstruction", draw 0 of each variant, the mean of the
    draws ("mean_of_draws_...", the model's mean prediction: a single draw x~ of an exact model
    costs E|x~ - x|^2 = 2 tr Var(x | past), the mean of N draws tr Var (1 + 1/N)) and every draw
    ("draws_...", uint8, for the action classifier)."""
    recon = decode_frames(model, codes["test"].long())
    mse = ((recon - data["test_frames"].movedim(-1, -3).float() / 255) ** 2).mean().item()
    metrics = image_metrics(mse, data["variance"], codes["test"], model.config.num_embeddings)
    del recon
    frames, given = data["eval_frames"], data["eval_frames"].shape[2] - data["eval_actions"].shape[2]
    videos = {"truth": frames.movedim(-1, -3).float() / 255,
              "vqvae_reconstruction": decode_frames(model, codes["eval"][:, :, given:])}
    for name, drawn in draws.items():
        decoded = torch.stack([decode_frames(model, one_draw) for one_draw in drawn])
        videos[name], videos[f"mean_of_draws_{name}"] = decoded[0], decoded.mean(0)
        videos[f"draws_{name}"] = to_uint8(decoded)                      # for the action classifier: every draw
    metrics.update(video_metrics(frames, codes["eval"], {name: drawn[0] for name, drawn in draws.items()}, videos))
    metrics.update(action_following(classifier, model, data, codes, videos, device))
    return metrics, videos


def mse_per_step(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean squared error (generated,) per generated step of videos (S, 3, generated, 3, 84, 84)."""
    return ((x - truth) ** 2).mean((0, 1, 3, 4, 5))


def video_metrics(frames, codes, generated: dict, videos: dict) -> dict:
    """From the true clips (S, 3, given + generated, 84, 84, 3) uint8 and their codes, the generated
    codes (draw 0) and the decoded videos: per generated step the mean squared error (pixels in
    [0, 1]) and the code accuracy of the model with the true actions, with shuffled actions
    (shuffle_actions), of the mean of the draws, of copying the last real frame, and of the VQ-VAE's
    reconstruction of the truth (the floor of what codes can reach); their means, overall and per
    continuation."""
    S, V = frames.shape[:2]
    given = frames.shape[2] - videos["vqvae_reconstruction"].shape[2]
    truth = frames[:, :, given:].movedim(-1, -3).float() / 255          # (S, 3, 10, 3, 84, 84)
    truth_codes = codes[:, :, given:]
    last = frames[:, :, given - 1:given].movedim(-1, -3).float() / 255
    mse = {name: mse_per_step(videos[name], truth) for name in MODEL_PREDICTIONS}
    mse.update({"copy_last_frame": mse_per_step(last.expand_as(truth), truth),
                "vqvae_reconstruction": mse_per_step(videos["vqvae_reconstruction"], truth)})
    code_acc = {name: (z == truth_codes).float().mean((0, 1, 3, 4)) for name, z in generated.items()}
    code_acc["copy_last_frame"] = (codes[:, :, given - 1:given] == truth_codes).float().mean((0, 1, 3, 4))
    metrics = {"eval_starts": S, "eval_sequences": S * V}
    for name, curve in mse.items():
        metrics[f"mse_{name}"] = curve.mean().item()
        metrics[f"mse_per_step_{name}"] = curve.tolist()
    for name, curve in code_acc.items():
        metrics[f"code_accuracy_{name}"] = curve.mean().item()
        metrics[f"code_accuracy_per_step_{name}"] = curve.tolist()
    for v, name in enumerate(SCRIPTS):   # per continuation, mean over the generated steps
        for variant in MODEL_PREDICTIONS:
            metrics[f"mse_{name}_{variant}"] = ((videos[variant][:, v] - truth[:, v]) ** 2).mean().item()
        metrics[f"mse_{name}_copy_last_frame"] = ((last[:, v] - truth[:, v]) ** 2).mean().item()
    return metrics


# ============================================================================ does the video follow the action?
# An action classifier names the action between two consecutive frames. It is trained on real
# transitions passed through the VQ-VAE (decoded from their codes), so that it sees the image
# statistics of generated frames, and then asked which action each generated transition shows.
class ActionClassifier(nn.Module):
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
# turns swap. The action classifier trains on both, so that it must tell a turn by the way the view moves.
MIRRORED = torch.tensor([ACTIONS.index(a.replace("left", "?").replace("right", "left").replace("?", "right"))
                         for a in ACTIONS])


def mirror(pairs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (..., 2, 3, H, W) flipped left to right, and their actions (...) with the turns swapped."""
    return pairs.flip(-1), MIRRORED[actions]


# How the action classifier is trained besides its steps and seed: part of what it is made from
# (action_classifier).
ACTION_CLASSIFIER = dict(channels=64, batch_size=64, lr=1e-3, max_shift=ActionClassifier.max_shift,
                         max_vertical_shift=ActionClassifier.max_vertical_shift)


def action_classifier_made_from(vqvae_id: str, train_codes: torch.Tensor, actions: torch.Tensor, steps: int,
                                seed: int) -> dict:
    """What an action classifier is made from, recorded in action_classifier.pt: the VQ-VAE, the
    training episodes (their codes (E, T+1, 21, 21) and actions (E, T)), steps, seed and
    ACTION_CLASSIFIER. It does not depend on the prior, so an evaluation of another prior or
    sampler judges with the same classifier."""
    return {"vqvae": vqvae_id, "episodes": content_key(train_codes, actions), "steps": steps, "seed": seed,
            **ACTION_CLASSIFIER}


def new_action_classifier(seed: int, device) -> ActionClassifier:
    """An untrained classifier whose weights depend on `seed` alone (the global random state is kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ActionClassifier(ACTION_CLASSIFIER["channels"]).to(device)


def load_action_classifier(path: Path, made_from: dict, device) -> ActionClassifier | None:
    """The finished classifier of `path` if it was made from `made_from`, else None."""
    state = load_checkpoint(path) if path.exists() else None
    if state is None or state.get("made_from") != made_from or state.get("step") != made_from["steps"]:
        return None
    classifier = ActionClassifier(ACTION_CLASSIFIER["channels"]).to(device)
    classifier.load_state_dict(state["model"])
    print(f"[action_classifier] read from {path}", flush=True)
    return classifier.eval()


def transition_draws(num_episodes: int, episode_length: int, steps: int, seed: int) -> list:
    """For each training step, (transitions (64,), whether to mirror each): one random stream seeded
    by `seed`, drawn up front so that a step's batch depends on the step alone, as a resumed run
    needs. One draw more than `steps`: lab.train.fit's check of a checkpoint looks at the next batch."""
    generator, batch_size = torch.Generator().manual_seed(seed), ACTION_CLASSIFIER["batch_size"]
    return [(torch.randint(num_episodes * episode_length, (batch_size,), generator=generator),
             torch.rand(batch_size, generator=generator) < 0.5) for _ in range(steps + 1)]


def transition_batch(frames: torch.Tensor, actions: torch.Tensor, index: torch.Tensor, flip: torch.Tensor):
    """(pairs (B, 2, 3, 84, 84) uint8, actions (B,)) of the transitions `index` (into episode x step)
    of frames (E, T+1, 3, 84, 84) under actions (E, T), each mirrored where `flip`."""
    T = actions.shape[1]
    e, t = index // T, index % T
    pairs, target = torch.stack([frames[e, t], frames[e, t + 1]], 1), actions[e, t]
    flipped_pairs, flipped_target = mirror(pairs, target)
    return (torch.where(flip[:, None, None, None, None], flipped_pairs, pairs),
            torch.where(flip, flipped_target, target))


@torch.no_grad()
def predict_actions(classifier: ActionClassifier, pairs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The classifier's action (...) for pairs (..., 2, 3, 84, 84) uint8."""
    flat = pairs.reshape(-1, *pairs.shape[-4:])
    device = next(classifier.parameters()).device
    out = [classifier(flat[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(flat), batch_size)]
    return torch.cat(out).reshape(pairs.shape[:-4])


@torch.no_grad()
def action_following(classifier, model, data: dict, codes: dict, videos: dict, device) -> dict:
    """The action classifier's verdicts (action_accuracies) on the held-out episodes and the eval
    videos, all decoded from their codes."""
    t0 = time.perf_counter()
    given = data["eval_frames"].shape[2] - data["eval_actions"].shape[2]
    last = decode_frames(model, encode_frames(model, data["eval_frames"][:, :, given - 1:given], device))
    metrics = action_accuracies(classifier, to_uint8(decode_frames(model, codes["test"].long())), data["test_actions"],
                                last, videos, data["eval_actions"])
    print(f"[eval] action classifier applied in {time.perf_counter() - t0:.0f} s: "
          f"real held-out {metrics['action_accuracy_real_test']:.1%}, generated with true actions "
          f"{metrics['action_accuracy_true_actions']:.1%}, with shuffled {metrics['action_accuracy_shuffled_actions']:.1%}",
          flush=True)
    return metrics


def action_accuracies(classifier, test_frames: torch.Tensor, test_actions: torch.Tensor, last: torch.Tensor,
                      videos: dict, actions: torch.Tensor) -> dict:
    """How often the action classifier names the commanded action.

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
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = (("mse_per_step", "pixel MSE to the true frame (lower is better)"),
              ("code_accuracy_per_step", "codes equal to those of the true frame"),
              ("action_accuracy_per_step", "transitions the classifier names as commanded"))
    for ax, (panel, panel_title) in zip(axes, panels):
        for color, name, style in ((0, "true_actions", "-o"), (1, "shuffled_actions", "-o"),
                                   (0, "mean_of_draws_true_actions", "--"), (1, "mean_of_draws_shuffled_actions", "--"),
                                   (2, "copy_last_frame", "-o"), (3, "vqvae_reconstruction", ":")):
            key = f"{panel}_{name}"
            if key in curves:
                steps = range(1, len(curves[key]) + 1)
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
    save(fig, path)


def save_strips(out: Path, videos: dict, num_starts: int = 3) -> None:
    """Per continuation, a PNG strip: rows of the real frames then the true / generated ones, per start."""
    given = videos["truth"].shape[2] - videos["true_actions"].shape[2]
    for v, name in enumerate(SCRIPTS[:2]):
        rows = []
        for s in range(min(num_starts, len(videos["truth"]))):
            real = videos["truth"][s, v, :given]
            rows += [(f"{s}: truth", videos["truth"][s, v]),
                     (f"{s}: generated", torch.cat([real, videos["true_actions"][s, v]])),
                     (f"{s}: shuffled actions", torch.cat([real, videos["shuffled_actions"][s, v]]))]
        save_image_rows(out / f"video_{name}.png", rows,
                        f'"{name}": {given} real frames, then {videos["true_actions"].shape[2]} generated in latent '
                        'space (red line: where the real frames end)', divider=given)


def side_by_side(videos: torch.Tensor) -> torch.Tensor:
    """Videos (n, T, 3, H, W) -> one video (T, 3, H, n W), the n placed left to right."""
    return torch.cat(list(videos.unbind(0)), -1)


def save_gif(path: Path, videos: dict, v: int, num_starts: int = 4) -> None:
    """An animated GIF: for a few starts side by side, the truth above and the generated frames below."""
    from PIL import Image   # a dependency of matplotlib
    n = min(num_starts, len(videos["truth"]))
    given = videos["truth"].shape[2] - videos["true_actions"].shape[2]
    top = videos["truth"][:n, v]
    bottom = torch.cat([videos["truth"][:n, v, :given], videos["true_actions"][:n, v]], 1)
    grid = torch.cat([side_by_side(top), side_by_side(bottom)], -2)     # (16, 3, 2H, n W)
    images = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).quantize(
        64, dither=Image.Dither.NONE) for f in grid]   # undithered: noisy textures make GIFs large
    write_atomically(path, lambda tmp: images[0].save(tmp, save_all=True, append_images=images[1:], duration=300,
                                                       loop=0, optimize=True))


def video_figures(run, model, data: dict, codes: dict, metrics: dict, videos: dict) -> None:
    """Into run.out: held-out frames and their reconstructions, code usage, the training curves,
    the error curves, and per continuation a strip (PNG) and an animation (GIF)."""
    out = run.out
    frames = data["test_frames"][:2, ::25].flatten(0, 1)[:12]
    recon = decode_frames(model, encode_frames(model, frames, run.device))
    save_image_rows(out / "reconstructions.png", [("original", frames.movedim(-1, -3).float() / 255),
                                                  ("reconstruction", recon)],
                    "held-out frames and their reconstructions (84x84 -> 21x21 codes)")
    plot_code_usage(out / "codebook_usage.png", codes["test"], model.config.num_embeddings,
                    "held-out frames' code usage:")
    plot_history(out / "vqvae_curves.png", run.histories["vqvae"], ["loss", "recon_loss", "perplexity"],
                 "frame VQ-VAE training")
    plot_history(out / "prior_curves.png", run.histories["prior"], ["prior_loss"], "prior (nats per code)")
    plot_error_curves(out / "error_curves.png", metrics)
    save_strips(out, videos)
    for v, name in enumerate(SCRIPTS[:2]):
        save_gif(out / f"video_{name}.gif", videos, v)


# ============================================================================ several seeds
def summarize_seeds(out: Path, runs: list[Path]) -> dict:
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
    write_json(out / "metrics.json", {
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
