"""What the training scripts share, off the reading path: plain modules, each one concern, imported
by name (`from lab import cli, runs, train`). vqvae.py, the model, knows nothing of them.

  cli          the command line: presets, options named after the model configs, range checks,
               the progress line
  runs         a run: processes and DDP, the locked --out folder, its options, the models it reads
               back (Run.load), metrics.json and report.md; load_run gives a run's models back
  train        the training loop (fit): schedule, mixed precision, non-finite stop, checkpoints, Ctrl-C
  guards       what keeps results safe: the lock, checksums, content keys, resume checks, divergence
  files        atomic writes, checkpoints, caches keyed by what they were made from; DataError
  images       CIFAR-10 and image folders; image metrics
  speech       FSDD and VCTK; WAV files, resampling, crops
  speech_eval  log-mel classifiers, the phone probe, scores of generated speech
  episodes     ViZDoom episodes of a random agent; frames
  video_eval   errors of generated videos, the action classifier, the seeds' summary
  figures      image grids, training curves, code usage

Reuse a trained model:  from lab.runs import load_run;  model, prior = load_run("runs/cifar_quick")
"""
