"""The paper's video experiment (Sec. 4.4), in ViZDoom's first-person maze instead of DeepMind Lab.

Stages, each resumable: (1) collect: episodes of a random agent (each action held for a few
steps) in the scenario `my_way_home`, 84x84 RGB, seeded, repeatable and cached in --data-dir;
(2) vqvae: a frame VQ-VAE, 84x84x3 -> 21x21 codes with K = 512; (3) prior: the codes of frame t+1
given those of the frames before it and the action (vqvae.ActionConditionalPrior); (4)
action_classifier: a classifier of the action between two frames, trained on real transitions
passed through the VQ-VAE (not in the paper); (5) eval: from 6 real frames of held-out episodes,
10 frames are generated in latent space (with classifier-free guidance toward the action,
--guidance) while the agent goes "forward", "turn_right" or keeps its random actions, decoded only
at the end, and compared per step with the truth, replayed in the deterministic engine with the
same seed: the model with the true actions, with shuffled actions (another sequence's), and
copying the last real frame; the action classifier says whether the generated transitions show the
action they were given. Everything lands in --out: vqvae.pt, prior.pt, codes.pt,
action_classifier.pt, metrics.json, *.png and *.gif; with --seeds, one such folder per seed and
their mean and spread. The environment is in lab/episodes.py, the measures and figures in
lab/video_eval.py.

    pip install vizdoom==1.3.2          # optional dependency: the engine, Freedoom and the scenarios
    python train_video.py               # quick preset: the whole pipeline on a CPU
    python train_video.py --seeds 0 1 2     # three runs, and their mean and spread
    python train_video.py --preset paper    # larger model, more data and steps: a GPU job
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vqvae
from lab import cli, episodes, guards, runs, train, video_eval
from lab.files import load_checkpoint

GIVEN, GENERATED = 6, 10   # the paper's protocol: 6 real frames, then 10 generated

# Each preset sets the defaults of the options below (named after the config fields); any option on
# the command line wins. What each costs and scores: docs/results/video.md.
PRESETS = {
    # The whole pipeline on a CPU: 9.6k training frames, a small frame VQ-VAE, and a prior whose
    # autoregressive part (441 passes per frame) is small, so that sampling the eval videos stays
    # affordable; sampled with guidance toward the action (not in the paper).
    "quick": dict(episodes=48, episode_length=200, test_episodes=16, hidden_channels=64, res_channels=32,
                  num_res_layers=2, embedding_dim=64, num_embeddings=512, decay=0.99, commitment_cost=0.25,
                  kmeans_init=True, dead_code_threshold=0.1, lr=1e-3, lr_schedule="constant", batch_size=16, steps=2000,
                  prior_context_frames=4, prior_channels=32, prior_num_layers=3, prior_context_channels=128,
                  prior_context_layers=4, prior_context_codebook=True, prior_steps=4500, prior_batch_size=16,
                  prior_lr=1e-3, prior_lr_schedule="cooldown", guidance=0.5, action_classifier_steps=9000),
    # Sec. 4.4 gives 84x84 frames -> 21x21 codes with K = 512; the rest is not given.
    "paper": dict(episodes=1000, episode_length=500, test_episodes=32, hidden_channels=128, res_channels=64,
                  num_res_layers=2, embedding_dim=64, num_embeddings=512, decay=0.99, commitment_cost=0.25,
                  kmeans_init=False, dead_code_threshold=None, lr=3e-4, lr_schedule="constant", batch_size=64, steps=100_000,
                  prior_context_frames=4, prior_channels=128, prior_num_layers=8, prior_context_channels=256,
                  prior_context_layers=8, prior_context_codebook=True, prior_steps=200_000, prior_batch_size=64,
                  prior_lr=3e-4, prior_lr_schedule="constant", guidance=0.0, action_classifier_steps=9000),
}


def parse_args(argv=None) -> argparse.Namespace:
    count = cli.checked(int, at_least=1)
    p = cli.Parser(__doc__, PRESETS, name="video", stages="collect,vqvae,prior,action_classifier,eval", log_every=50,
                   checkpoint_every=500)
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where collected episodes are cached")
    g = p.add_argument_group("environment (defaults from --preset)")
    g.add_argument("--episodes", type=count, help="training episodes")
    g.add_argument("--test-episodes", type=count, help="held-out episodes (other seeds); eval starts from each")
    g.add_argument("--episode-length", type=count, help="actions per episode")
    g.add_argument("--frame-skip", type=count, default=4, help="engine tics per action (a turn is 14 degrees at 4)")
    g.add_argument("--max-hold", type=count, default=4, help="the random agent holds each action 1..max-hold steps")
    g = p.add_argument_group("frame VQ-VAE (defaults from --preset)")
    p.add_encoder_options(g)
    p.add_codebook_options(g)
    p.add_optimizer_options(g, "frames per step")
    g = p.add_argument_group("action-conditional prior (defaults from --preset)")
    g.add_argument("--prior-context-frames", type=count, help=f"frames of codes the prior conditions on (<= {GIVEN})")
    p.add_prior_options(g, schedule=True)
    g.add_argument("--prior-context-channels", type=count, help="context network channels")
    g.add_argument("--prior-context-layers", type=count, help="context network residual blocks")
    g.add_argument("--prior-context-codebook", action=argparse.BooleanOptionalAction,
                   help="the context network reads the earlier frames as z_q (the VQ-VAE's codebook vectors) "
                        "instead of a learned embedding of their codes")
    g = p.add_argument_group("evaluation")
    g.add_argument("--temperature", type=cli.checked(float, above=0), default=1.0,
                   help="sampling temperature of the prior")
    g.add_argument("--guidance", type=cli.checked(float, at_least=0),
                   help="classifier-free guidance of sampling: each code drawn from log p(z|a) + w (log p(z|a) - "
                        "log p(z)), p(z) the mean over actions; 0 samples the prior as it is")
    g.add_argument("--eval-draws", type=count, default=4,
                   help="continuations drawn per sequence: all are judged, the first is shown, their mean "
                        "estimates the model's prediction in pixel MSE (default 4)")
    g.add_argument("--seeds", type=cli.checked(int, at_least=0, below=2 ** 32), nargs="+", metavar="N",
                   help="run the pipeline once per seed (collection, training, sampling), each into <out>/seed_<N>, "
                        "then write their mean and spread to <out>/metrics.json and <out>/error_curves.png")
    g.add_argument("--action-classifier-steps", type=cli.STEPS,
                   help="steps of the action classifier that names the action between two frames (batch 64)")
    p.may_change_on_resume("temperature", "guidance", "eval_draws", "action_classifier_steps", "data_dir")
    args = p.parse(argv)
    if args.prior_context_frames > GIVEN:
        p.error(f"--prior-context-frames: expected 1..{GIVEN} (the given frames); got {args.prior_context_frames}")
    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds: expected distinct seeds; got {' '.join(map(str, args.seeds))}")
    if args.episode_length < GIVEN + GENERATED:
        p.error(f"--episode-length: expected at least {GIVEN + GENERATED}; got {args.episode_length}")
    return args


# ============================================================================ the paper's stages
def collect(args) -> dict:
    """Stage 1: the random agent's training and held-out episodes and the eval clips (GIVEN +
    GENERATED frames per start and continuation), cached in --data-dir by their settings."""
    return episodes.collect_episodes(args.data_dir, args.episodes, args.test_episodes, args.episode_length,
                                     args.frame_skip, args.max_hold, args.seed, GIVEN, GENERATED)


def train_vqvae(args, run, data) -> None:
    """Stage 2: the frame VQ-VAE (Sec. 3, Eq. 3), Adam on seeded batches of every frame of the
    training episodes; the reconstruction term scaled by the training pixels' variance."""
    frames = data["train_frames"].flatten(0, 1)                          # (E (T+1), 84, 84, 3) uint8
    config = cli.config(vqvae.VQVAEConfig, args, in_channels=3, data_variance=data["variance"])
    model = vqvae.VQVAE(config).to(run.device)

    def loss_fn(model, step):
        x = episodes.frames_to_float(frames[run.batch(step, len(frames), args.batch_size, args.seed)], run.device)
        out = model(x)                                                   # x (B, 3, 84, 84) in [-0.5, 0.5]
        metrics = {"loss": out.loss, "recon_loss": out.recon_loss, "commitment_loss": out.commitment_loss,
                   "perplexity": out.perplexity, "codes_used": (out.counts > 0).sum().float()}
        return out.loss, {k: v.detach() for k, v in metrics.items()}

    train.fit(run, "vqvae", model, loss_fn, args.steps, args.lr, args.lr_schedule)


def frame_codes(run, model, data) -> dict[str, torch.Tensor]:
    """The codes (E, T+1, 21, 21) of every training and held-out frame, cached in <out>/codes.pt for
    this VQ-VAE and these episodes."""
    seeds = {"train_seeds": data["train_seeds"].tolist(), "test_seeds": data["test_seeds"].tolist()}

    def encode():
        return {split: episodes.encode_frames(model, data[f"{split}_frames"], run.device).to(torch.int16)
                for split in ("train", "test")}
    return run.cached("codes", seeds, encode)


def transitions(num_episodes: int, episode_length: int, context_frames: int) -> torch.Tensor:
    """(episode, t) of every transition with a full context: frames t-F+1..t -> t+1 under action t."""
    e, t = torch.meshgrid(torch.arange(num_episodes), torch.arange(context_frames - 1, episode_length), indexing="ij")
    return torch.stack([e.flatten(), t.flatten()], 1)


def context_of(codes: torch.Tensor, e: torch.Tensor, t: torch.Tensor, context_frames: int) -> torch.Tensor:
    """Codes of frames t-F+1..t of episodes e: (B, F, 21, 21)."""
    return codes[e[:, None], t[:, None] + torch.arange(1 - context_frames, 1)]


def train_prior(args, run, model, codes: torch.Tensor, actions: torch.Tensor):
    """Stage 3: p(z_t+1 | z_t-F+1..t, a_t), fitted by maximum likelihood to the codes (E, T+1, 21, 21)
    of the training episodes under their actions (E, T)."""
    config = cli.config(vqvae.ActionConditionalPriorConfig, args, "prior_", num_embeddings=model.config.num_embeddings,
                        num_actions=len(episodes.ACTIONS),
                        embedding_dim=model.config.embedding_dim if args.prior_context_codebook else 0)
    prior = vqvae.ActionConditionalPrior(config).to(run.device)
    if config.embedding_dim:
        prior.set_codebook(model.quantizer.codebook)
    pairs = transitions(len(codes), actions.shape[1], config.context_frames)
    codes = codes.long()

    def loss_fn(prior, step):
        e, t = pairs[run.batch(step, len(pairs), args.prior_batch_size, args.seed + 1)].unbind(1)
        target = codes[e, t + 1].to(run.device)
        context = context_of(codes, e, t, config.context_frames).to(run.device)       # (B, F, 21, 21)
        loss = F.cross_entropy(prior(target, context, actions[e, t].to(run.device)), target)   # nats per code
        return loss, {"prior_loss": loss.detach()}

    train.fit(run, "prior", prior, loss_fn, args.prior_steps, args.prior_lr, args.prior_lr_schedule,
              made_for=run.vqvae_id)
    return prior.eval()


def train_action_classifier(args, run, model, codes: torch.Tensor, data):
    """Stage 4 (not in the paper): the action classifier that eval asks which action each generated
    transition shows (video_eval.ActionClassifier). It trains on the training episodes' transitions
    passed through the VQ-VAE (decoded from their codes (E, T+1, 21, 21)), so that it sees the image
    statistics of generated frames, each mirrored with probability 1/2; the learning rate cooled down
    over the last 20% of the steps. Kept in action_classifier.pt with what it was made from (another
    VQ-VAE, other episodes or settings train a new one); trained on the main process alone."""
    path, steps, actions = args.out / "action_classifier.pt", args.action_classifier_steps, data["train_actions"]
    made_from = video_eval.action_classifier_made_from(run.vqvae_id, codes, actions, steps, args.seed)
    classifier = video_eval.load_action_classifier(path, made_from, run.device)
    if classifier is not None:
        return classifier
    if path.exists() and load_checkpoint(path).get("made_from") != made_from:
        path.unlink()   # made from another VQ-VAE, other episodes or settings
    classifier = video_eval.new_action_classifier(args.seed, run.device)
    frames = episodes.to_uint8(episodes.decode_frames(model, codes.long()))   # (E, T+1, 3, 84, 84)
    draws = video_eval.transition_draws(*actions.shape, steps, args.seed)

    def loss_fn(classifier, step):
        pairs, target = video_eval.transition_batch(frames, actions, *draws[step])
        loss = F.cross_entropy(classifier(pairs.to(run.device)), target.to(run.device))
        return loss, {"loss": loss.detach()}

    train.fit(run.alone(), "action_classifier", classifier, loss_fn, steps, video_eval.ACTION_CLASSIFIER["lr"],
              "cooldown", extra={"made_from": made_from})
    return classifier.eval()


def read_action_classifier(args, run, codes: torch.Tensor, data):
    """The finished action classifier of an earlier action_classifier stage, made from this VQ-VAE,
    these episodes and settings; refused otherwise."""
    path = args.out / "action_classifier.pt"
    made_from = video_eval.action_classifier_made_from(run.vqvae_id, codes, data["train_actions"],
                                                       args.action_classifier_steps, args.seed)
    classifier = video_eval.load_action_classifier(path, made_from, run.device)
    if classifier is None:
        raise SystemExit(f"{path}: missing, unfinished, or made from another VQ-VAE, other episodes or settings: "
                         "run the action_classifier stage first")
    return classifier


# ============================================================================ evaluation
@torch.no_grad()
def prior_test_nats(prior, codes: torch.Tensor, actions: torch.Tensor, device, batch_size: int = 64) -> dict:
    """Teacher-forced -log p(z_t+1 | context, a_t) per code on held-out episodes, with the true
    actions and with the actions of a random permutation of the transitions."""
    pairs = transitions(len(codes), actions.shape[1], prior.context_frames)
    codes = codes.long()
    shuffled = actions.flatten()[torch.randperm(actions.numel(), generator=torch.Generator().manual_seed(0))]
    shuffled = shuffled.reshape(actions.shape)
    totals = {"prior_test_nats_per_code": 0.0, "prior_test_nats_per_code_shuffled_actions": 0.0}
    for i in range(0, len(pairs), batch_size):
        e, t = pairs[i:i + batch_size].unbind(1)
        target, context = codes[e, t + 1].to(device), context_of(codes, e, t, prior.context_frames).to(device)
        for key, acts in zip(totals, (actions, shuffled)):
            totals[key] -= prior.log_prob(target, context, acts[e, t].to(device)).sum().item()
    return {k: v / (len(pairs) * codes[0, 0].numel()) for k, v in totals.items()}


@torch.no_grad()
def sample_continuations(args, run, prior, codes: torch.Tensor, data) -> dict[str, torch.Tensor]:
    """The codes (N, S, 3, 10, 21, 21) of N = --eval-draws continuations the prior samples after
    the GIVEN real frames of codes (S, 3, 16, 21, 21), with the true actions (S, 3, 10) and with
    shuffled ones (each sequence takes another continuation's actions), from one random stream
    seeded by --seed: draw 0 with either, then draw 1, and so on."""
    S, V = codes.shape[:2]
    context = codes[:, :, GIVEN - args.prior_context_frames:GIVEN].flatten(0, 1).to(run.device)
    commanded = {"true_actions": data["eval_actions"], "shuffled_actions": data["eval_shuffled_actions"]}
    gen = torch.Generator(device=run.device).manual_seed(args.seed)
    generated = {name: [] for name in commanded}
    for draw in range(1, args.eval_draws + 1):
        t0 = time.perf_counter()
        for name, acts in commanded.items():
            drawn = prior.sample(context, acts.flatten(0, 1).to(run.device), generator=gen,
                                 temperature=args.temperature, guidance=args.guidance)
            generated[name].append(drawn.cpu().reshape(S, V, GENERATED, *drawn.shape[-2:]))
        run.print(f"[eval] draw {draw}/{args.eval_draws}: {S * V} x {GENERATED} frames of codes with the true "
                  f"actions and as many with shuffled ones in {time.perf_counter() - t0:.0f} s")
    return {name: torch.stack(drawn) for name, drawn in generated.items()}


@torch.no_grad()
def evaluate(args, run, model, prior, classifier, data, codes: dict) -> tuple[dict, dict]:
    """Test-set numbers: the frame VQ-VAE's (reconstruction error, code usage), the prior's
    teacher-forced nats on the held-out episodes, and those of the videos it generates from the
    eval clips: per-step errors against the truth and the action classifier's verdicts
    (video_eval.evaluate_videos). Returns (metrics, videos)."""
    codes["eval"] = episodes.encode_frames(model, data["eval_frames"], run.device)   # (S, 3, 16, 21, 21)
    draws = sample_continuations(args, run, prior, codes["eval"], data)
    metrics, videos = video_eval.evaluate_videos(model, classifier, data, codes, draws, run.device)
    metrics.update(prior_test_nats(prior, codes["test"], data["test_actions"], run.device))
    return metrics, videos


# ============================================================================ main
def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.seeds:
        return run_pipeline(args)
    outs = [args.out / f"seed_{seed}" for seed in args.seeds]
    for seed, out in zip(args.seeds, outs):
        print(f"=== seed {seed}: {out}", flush=True)
        run_pipeline(argparse.Namespace(**{**vars(args), "seed": seed, "out": out, "seeds": None}))
    if int(os.environ.get("RANK", "0")) == 0 and "eval" in args.stages:
        video_eval.summarize_seeds(args.out, outs)


def run_pipeline(args: argparse.Namespace) -> None:
    """The stages of one run, as --stages asks, into args.out."""
    run = runs.Run.start(args)
    data = collect(args)
    run.timings["collect_seconds"] = data.pop("collect_seconds")
    run.use_data(data["train_frames"], data["train_actions"])
    run.print(f"my_way_home: {data['train_frames'].shape[0]} x {data['train_frames'].shape[1]} training frames, "
              f"{len(data['test_frames'])} held-out episodes, {len(data['eval_frames'])} eval starts; preset "
              f"{args.preset}")
    if "prior" in args.stages:
        guards.check_fits(f"--num-embeddings {args.num_embeddings}: the prior's logits of a batch, with their softmax "
                          "and gradient,", 3 * args.prior_batch_size * (episodes.FRAME_SIZE // 4) ** 2
                          * args.num_embeddings, run.device, "lower --num-embeddings or --prior-batch-size")

    if "vqvae" in args.stages:
        train_vqvae(args, run, data)
    if not {"prior", "action_classifier", "eval"} & args.stages:
        run.end_training()
        return
    model = run.load("vqvae")
    codes = frame_codes(run, model, data)
    if "prior" in args.stages:
        prior = train_prior(args, run, model, codes["train"], data["train_actions"])
    elif "eval" in args.stages:
        prior = run.load("prior")

    if not run.end_training():   # the main process alone from here
        return
    if "action_classifier" in args.stages:
        classifier = train_action_classifier(args, run, model, codes["train"], data)
    elif "eval" in args.stages:
        classifier = read_action_classifier(args, run, codes["train"], data)
    if "eval" in args.stages:
        metrics, videos = evaluate(args, run, model, prior, classifier, data, codes)
        video_eval.video_figures(run, model, data, codes, metrics, videos)
        run.report({k: v for k, v in metrics.items() if not isinstance(v, list)}, model.config,
                   curves={k: v for k, v in metrics.items() if isinstance(v, list)},
                   prior_config=dataclasses.asdict(prior.config))


if __name__ == "__main__":
    runs.run_main(main)
