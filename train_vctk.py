"""The paper's speech experiments (Sec. 4.3), end to end.

Stages, each resumable: (1) vqvae: train the audio VQ-VAE (64x downsampling encoder, K = 512,
WaveNet decoder conditioned on the codes and the speaker) on random fixed-length crops; (2)
classifiers: a speaker and a digit classifier on log-mel features of real training clips, which
listen to generated audio in eval (not in the paper); (3) prior: a second WaveNet over the codes of
the first --clip-seconds of each training clip, conditioned on the speaker (the paper's prior for
unconditional speech); (4) eval: teacher-forced test loss, reconstructions and speaker conversions
generated with the WaveNet (WAV files and spectrograms), the classifiers applied to them, and the
phone probe of the paper (each code mapped to its most frequent aligned phone; frame accuracy on
test clips) against the same probe on a randomly initialised encoder and the majority phone; with a
prior, its test bits per code and samples from it (codes sampled, then decoded), scored by the
classifiers. Everything lands in --out: vqvae.pt, classifiers.pt, codes.pt, prior.pt, metrics.json,
report.md, *.png, audio/*.wav.

    python train_vctk.py --data ../shared/data/fsdd     # quick preset on FSDD (8 kHz digits)
    python train_vctk.py --data ../shared/data/fsdd --preset long   # quick with 4x the VQ-VAE's steps
    python train_vctk.py --data ~/VCTK-Corpus           # VCTK 0.80 (wav48/pNNN/*.wav), at 16 kHz
    python train_vctk.py --data ~/VCTK-Corpus-0.92      # VCTK 0.92 (*_mic1.flac): pip install soundfile

The phone probe reads FSDD/alignments.tsv, which the public FSDD lacks: `python docs/align_fsdd.py
DIR` makes it (with the optional PocketSphinx); without it the probe is skipped, with one line.
VCTK has no digits and no alignments: there the digit classifier and the probe are skipped. A
held-out VCTK clip is every 10th utterance of each speaker (the corpus has no split).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vqvae
from lab import cli, figures, guards, runs, speech, speech_eval, train
from lab.speech import HOP

# Each preset sets the defaults of the options below (named after the config fields); any option on
# the command line wins. What each costs and scores: docs/results/speech.md.
PRESETS = {
    # The whole pipeline on FSDD on a CPU: a small WaveNet (10 layers, receptive field 1024 samples),
    # 0.256 s crops; a prior of 12 layers whose receptive field (127 codes) spans the 1 s it models.
    # The EMA codebook collapses to a handful of codes at the start (the encoder's first outputs are
    # all nearest to one random code): k-means on the first batch and restarting codes unused for
    # ~200 steps (not in the paper) keep many codes in use.
    "quick": dict(hidden_channels=64, res_channels=32, num_res_layers=1, embedding_dim=64, num_embeddings=512,
                  decay=0.99, commitment_cost=0.25, kmeans_init=True, dead_code_threshold=0.1, wavenet_channels=32,
                  skip_channels=64, wavenet_layers=10, dilation_cycle=10, crop=2048, batch_size=8, steps=3000,
                  lr=1e-3, lr_schedule="constant", classifier_steps=1000, prior_channels=64, prior_num_layers=12,
                  prior_cycle=6, prior_steps=1000, prior_batch_size=32, prior_lr=1e-3),
    # Sec. 4.3 gives the encoder (6 stride-2 convolutions of window 4) and K = 512; the WaveNet's
    # size and the optimisation are not given: 30 layers in 3 cycles of dilations 1..512 and
    # 1 s crops are a common WaveNet setting. A GPU job. If the codebook collapses (see quick),
    # add --kmeans-init --dead-code-threshold 0.1.
    "paper": dict(hidden_channels=256, res_channels=256, num_res_layers=2, embedding_dim=64, num_embeddings=512,
                  decay=0.99, commitment_cost=0.25, kmeans_init=False, dead_code_threshold=None,
                  wavenet_channels=128, skip_channels=256, wavenet_layers=30, dilation_cycle=10, crop=16384,
                  batch_size=16, steps=200_000, lr=2e-4, lr_schedule="constant", classifier_steps=2000,
                  prior_channels=256, prior_num_layers=20, prior_cycle=10, prior_steps=100_000, prior_batch_size=32,
                  prior_lr=1e-3),
}
# quick trained longer: 4x the VQ-VAE's steps, 3x the classifiers' and 2x the prior's.
PRESETS["long"] = {**PRESETS["quick"], "steps": 12_000, "classifier_steps": 3000, "prior_steps": 2000}


def parse_args(argv=None):
    count, size, positive = cli.checked(int, at_least=1), cli.checked(int, at_least=0), cli.checked(float, above=0)
    p = cli.Parser(__doc__, PRESETS, name="speech", stages="vqvae,classifiers,prior,eval", log_every=50,
                   checkpoint_every=500)
    p.add_argument("--data", type=Path, default=None,
                   help="an FSDD checkout (recordings/*.wav, alignments.tsv) or a VCTK folder (wav48/ of 0.80 "
                        "or wav48_silence_trimmed/ of 0.92; from https://datashare.ed.ac.uk/handle/10283/3443)")
    p.add_argument("--sample-rate", type=count, default=16000, help="VCTK is resampled from 48 kHz to this")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="decoded (resampled) corpus caches")
    p.add_argument("--max-train-clips", type=count, default=None, help="a seeded random subset, for tests")
    p.add_argument("--max-test-clips", type=count, default=None, help="a seeded random subset, for tests")
    p.add_argument("--max-clips-per-speaker", type=count, default=None, help="read at most this many (VCTK)")
    p.add_argument("--eval-clips", type=count, default=120,
                   help="test clips reconstructed and converted (the same number per speaker); prior samples")
    p.add_argument("--wav-clips", type=size, default=6, help="of those, how many are written as WAV files")
    p.add_argument("--clip-seconds", type=positive, default=1.0, help="classifier input length (longer clips are cut)")
    p.add_argument("--temperature", type=positive, default=1.0,
                   help="sampling temperature of the WaveNets (decoder and prior) in eval")
    g = p.add_argument_group("audio VQ-VAE (defaults from --preset)")
    p.add_encoder_options(g, "encoder")
    p.add_codebook_options(g)
    g.add_argument("--wavenet-channels", type=count, help="residual channels of the WaveNet")
    g.add_argument("--skip-channels", type=count, help="skip channels of the WaveNet")
    g.add_argument("--wavenet-layers", type=count, help="layers of the WaveNet")
    g.add_argument("--dilation-cycle", type=count, help="dilations 1, 2, ..., 2^(cycle-1), repeated")
    g.add_argument("--crop", type=count, help=f"training crop in samples, a multiple of {HOP}")
    p.add_optimizer_options(g)
    g.add_argument("--classifier-steps", type=cli.STEPS, help="steps of the log-mel classifiers (batch 32)")
    g = p.add_argument_group("prior over codes: a WaveNet conditioned on the speaker (defaults from --preset)",
                             "Its skip channels are twice --prior-channels; a batch is --prior-batch-size code\n"
                             "sequences of --clip-seconds per process.")
    p.add_prior_options(g)
    g.add_argument("--prior-cycle", type=count, help="dilations 1, 2, ..., 2^(cycle-1), repeated")
    p.may_change_on_resume("classifier_steps", "max_test_clips", "eval_clips", "wav_clips", "temperature", "data_dir")
    args = p.parse(argv)
    if args.crop % HOP:
        p.error(f"--crop must be a multiple of {HOP}")
    return args


def clip_length(args, data) -> int:
    """Samples of --clip-seconds in whole codes: what the classifiers hear and the prior models."""
    return max(HOP, round(args.clip_seconds * data.sample_rate / HOP) * HOP)


def crop_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Crop offsets as a pure function of the step, so that a resumed run sees the same crops."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)


# ============================================================================ the paper's stages
def train_vqvae(args, run, data) -> None:
    """Stage 1 (Sec. 4.3): the audio VQ-VAE on random crops of the training clips, as mu-law levels,
    conditioned on the speaker; the loss is Eq. 3 with -log p(x | z_q) of the WaveNet decoder."""
    config = cli.config(vqvae.AudioVQVAEConfig, args, num_speakers=len(data.speakers))
    model = vqvae.AudioVQVAE(config).to(run.device)
    clips = data.train

    def loss_fn(model, step):
        idx = run.batch(step, len(clips.audio), args.batch_size, args.seed)
        crops = clips.random_crops(idx, args.crop, crop_generator(args.seed, step, run.rank))
        speaker = torch.from_numpy(clips.speaker[idx.numpy()])
        out = model(vqvae.mu_law_encode(crops).to(run.device), speaker.to(run.device))
        metrics = {"loss": out.loss, "recon_loss": out.recon_loss, "commitment_loss": out.commitment_loss,
                   "perplexity": out.perplexity, "codes_used": (out.counts > 0).sum().float()}
        return out.loss, {k: v.detach() for k, v in metrics.items()}

    train.fit(run, "vqvae", model, loss_fn, args.steps, args.lr, args.lr_schedule,
              extra={"speakers": data.speakers, "sample_rate": data.sample_rate})


def train_classifiers(args, run, data):
    """Stage 2 (not in the paper): the classifiers that eval listens with, a speaker and (FSDD) a digit classifier on
    log-mel features of random crops of real training clips, with a little white noise added."""
    length = clip_length(args, data)
    classifiers = speech_eval.Classifiers.for_speech(data).to(run.device)
    classifiers.normalise(data.train.audio, length, data.sample_rate)
    clips, batch = data.train, min(32, len(data.train.audio) // run.world_size)  # per process

    def loss_fn(model, step):
        idx = run.batch(step, len(clips.audio), batch, args.seed + 1).numpy()
        gen = crop_generator(args.seed + 1, step, run.rank)
        features, labels = speech_eval.Classifiers.training_examples(clips, idx, length, data.sample_rate, gen,
                                                                     run.device)
        losses = {f"{k}_loss": F.cross_entropy(logits, labels[k]) for k, logits in model(features).items()}
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}

    train.fit(run, "classifiers", classifiers, loss_fn, args.classifier_steps, lr=1e-3)
    return classifiers


def train_prior(args, run, model, data):
    """Stage 3 (Sec. 4.3): the prior p(z | speaker), a WaveNet over the codes of each training
    clip's first --clip-seconds (--prior-channels, --prior-num-layers, --prior-cycle; skip channels
    twice the channels), fitted by maximum likelihood."""
    length = clip_length(args, data)
    codes = run.cached("codes", {"samples": length},
                       lambda: {"train": speech_eval.clip_codes(model, data.train.audio, length, run.device)})["train"]
    speaker = torch.from_numpy(data.train.speaker)
    config = cli.config(vqvae.WaveNetConfig, args, "prior_", num_categories=model.config.num_embeddings,
                        cond_channels=0, num_speakers=len(data.speakers), skip_channels=2 * args.prior_channels)
    prior = vqvae.WaveNet(config).to(run.device)

    def loss_fn(prior, step):
        idx = run.batch(step, len(codes), args.prior_batch_size, args.seed + 2)
        target = codes[idx].to(run.device)
        loss = F.cross_entropy(prior(target, z_q=None, speaker=speaker[idx].to(run.device)), target)   # nats per code
        return loss, {"prior_loss": loss.detach()}

    train.fit(run, "prior", prior, loss_fn, args.prior_steps, args.prior_lr, made_for=run.vqvae_id)
    return prior.eval()


# ============================================================================ evaluation
@torch.no_grad()
def evaluate(args, run, model, classifiers, data) -> dict:
    """The classifiers on real test clips; the teacher-forced test loss of chosen test clips, and
    their codes decoded by the WaveNet as their own speaker (reconstruction) and as another
    speaker (conversion, Sec. 4.3), scored by the classifiers; with alignments, the phone probe."""
    length = clip_length(args, data)
    metrics = speech_eval.classifier_scores(classifiers, data, length, args.seed, run.device)
    # as many test clips of each speaker, each with another speaker to be converted to
    clips = speech_eval.choose_eval_clips(data.test, len(data.speakers), args.eval_clips, length, args.seed, run.device)
    o = model(clips.levels, clips.source)
    metrics.update(test_recon_nats_per_sample=o.recon_loss.item(), test_perplexity=o.perplexity.item())
    run.print(f"[eval] generating {2 * len(clips.picks)} clips of {clips.length} samples "
              "(reconstructions and conversions)")
    t0, generator = time.perf_counter(), torch.Generator(device=run.device).manual_seed(args.seed)
    waves = model.decode(o.codes.repeat(2, 1), torch.cat([clips.source, clips.target]), generator=generator,
                         temperature=args.temperature)
    metrics["generation_seconds"] = time.perf_counter() - t0
    metrics["generated_samples_per_second"] = waves.numel() / metrics["generation_seconds"]
    metrics.update(speech_eval.score_generated(classifiers, data, clips, waves.cpu(), length, args.out,
                                               args.wav_clips))
    if data.alignments is not None:
        metrics.update(speech_eval.phone_probe_scores(model, data, args.seed, args.out, run.device))
    else:
        run.print(f"[eval] phone probe skipped: {args.data} has no alignments.tsv (FSDD's: python docs/align_fsdd.py "
                  f"{args.data}; VCTK has none)")
    return metrics


@torch.no_grad()
def evaluate_prior(args, run, model, prior, classifiers, data) -> dict:
    """The prior's test bits per code (against the codes' unigram frequencies), and samples of it:
    codes sampled for each speaker, decoded by the VQ-VAE's WaveNet, scored by the classifiers."""
    length, S = clip_length(args, data), len(data.speakers)
    metrics = speech_eval.prior_bits_per_code(model, prior, data, length, run.device)
    per_speaker = max(1, args.eval_clips // S)
    run.print(f"[eval] sampling {per_speaker * S} code sequences from the prior and decoding them")
    generator = torch.Generator(device=run.device).manual_seed(args.seed + 2)
    who = torch.arange(S, device=run.device).repeat_interleave(per_speaker)
    codes = prior.sample(None, who, generator=generator, temperature=args.temperature, length=length // HOP)
    waves = model.decode(codes, who, generator=generator, temperature=args.temperature).cpu()
    return {**metrics, **speech_eval.score_prior_samples(classifiers, data, waves, who, per_speaker, length, args.out,
                                                         args.wav_clips, run.device)}


# ============================================================================ main
def main(argv=None) -> None:
    args = parse_args(argv)
    run = runs.Run.start(args)
    data = speech.load_speech(args.data, args.sample_rate, args.max_clips_per_speaker, args.data_dir,
                              args.max_train_clips, args.max_test_clips, args.seed)
    run.use_data(*data.train.audio, data.train.speaker)
    seconds = sum(len(a) for a in data.train.audio) / data.sample_rate
    run.print(f"speech: {len(data.train.audio)} train clips ({seconds / 60:.1f} min) / {len(data.test.audio)} test; "
              f"{len(data.speakers)} speakers; {data.sample_rate} Hz; preset {args.preset}")
    if "prior" in args.stages:
        guards.check_fits(f"--num-embeddings {args.num_embeddings}: the prior's logits of a batch, with their softmax "
                          "and gradient,", 3 * args.prior_batch_size * clip_length(args, data) // HOP
                          * args.num_embeddings, run.device, "lower --num-embeddings or --prior-batch-size")

    if "vqvae" in args.stages:
        train_vqvae(args, run, data)
    model = run.load("vqvae")
    if "classifiers" in args.stages:
        classifiers = train_classifiers(args, run, data)
    elif "eval" in args.stages:
        classifiers = speech_eval.Classifiers.load(args.out / "classifiers.pt", data, run.device)
    if "prior" in args.stages:
        prior = train_prior(args, run, model, data)
    else:
        prior = run.load("prior", optional=True) if "eval" in args.stages else None

    if run.end_training() and "eval" in args.stages:
        metrics = evaluate(args, run, model, classifiers, data)
        if prior is not None:
            metrics.update(evaluate_prior(args, run, model, prior, classifiers, data))
        figures.training_curves(args.out, run.histories, {"vqvae": "audio VQ-VAE training",
                                                          "prior": "speech prior training"})
        run.report(metrics, model.config, speakers=data.speakers, sample_rate=data.sample_rate,
                   num_train_clips=len(data.train.audio))


if __name__ == "__main__":
    runs.run_main(main)
