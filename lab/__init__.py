"""What the training scripts share, off the reading path: the command line (cli), the run
machinery (runs: processes and DDP, the training loop, checkpoints and exact resume, Ctrl-C,
locks, progress, metrics.json), files and caches (checkpoints), data readers and the measures
and figures of each modality (images, speech, video, figures). It knows no script's flags.
vqvae.py, the model, knows nothing of it.

Reuse a trained model:  model, prior = lab.load_run("runs/cifar_quick")
"""
# flake8: noqa: F401  (the package's public names)
from lab.checkpoints import content_key, load_checkpoint, load_model, model_fingerprint, save_checkpoint, write_json
from lab.cli import Parser, checked, config
from lab.figures import plot_code_usage, plot_history, pyplot, save_image_rows, training_curves
from lab.images import CLASSES, encode, image_metrics, load_images, pixel_variance, to_float
from lab.runs import DataError, Progress, Run, learning_rate, load_run, quantizer_backend, run_main
from lab.speech import Classifiers, SpeechEvaluation, clip_codes, load_speech
from lab.video import (ACTIONS, collect_episodes, encode_frames, evaluate_videos, frames_to_float, summarize_seeds,
                       video_figures)
