"""Why the VQ-VAE needs a prior: maps of codes drawn uniformly at random decode to noise, maps drawn
from the PixelCNN prior decode to images with the layout of their class.

Three rows, each decoded by the same trained decoder: 8x8 maps whose 64 codes are drawn
independently and uniformly from [0, K) (the prior the VQ-VAE assumes while it trains), maps sampled
from the class-conditional GatedPixelCNN (one class a column), and, for reference, the
reconstructions of a test image of the same class, whose codes came from the encoder.

    python train_cifar.py                                          # a run with a prior to draw from
    python docs/draw_random_codes.py --run runs/cifar_quick        # writes docs/random_codes.png

--data and --data-dir default to those the run was trained with (recorded in its vqvae.pt).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab import figures, images, runs  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    images.add_run_options(parser, "random_codes.png")
    parser.add_argument("--seed", type=int, default=0, help="seeds the uniform codes and the prior's samples")
    parser.add_argument("--columns", type=int, default=8, help="maps a row: one class each (at most the classes)")
    args = parser.parse_args(argv)

    model, prior = runs.load_run(args.run)
    if prior is None or prior.num_classes is None:
        raise SystemExit(f"{args.run}: no class-conditional prior.pt; train one with train_cifar.py --stages prior")
    if model.config.num_groups != 1:
        raise SystemExit(f"{args.run}: {model.config.num_groups} codes a position; this figure draws one")
    test = images.load_images_of_run(args)
    classes = test["classes"]
    # Classes that have a test image, for the reference row.
    labels = torch.tensor([c for c in range(min(prior.num_classes, len(classes)))
                           if (test["test_y"] == c).any()][:args.columns])

    K = model.config.num_embeddings
    with torch.no_grad():
        # For reference, and for the shape of the latent map: the first test image of each class.
        picks = [int((test["test_y"] == c).nonzero()[0]) for c in labels]
        encoded = model.quantize(model.encode(images.to_float(test["test_x"][picks], "cpu"))).codes
        shape = tuple(encoded.shape[1:])
        uniform = torch.randint(0, K, (len(labels), *shape), generator=torch.Generator().manual_seed(args.seed))
        sampled = prior.sample(shape, labels, generator=torch.Generator().manual_seed(args.seed))
        rows = [(label, (model.decode(codes) + 0.5).clamp(0, 1)) for label, codes in (
            (f"uniform codes in [0, {K})", uniform), ("sampled from the prior", sampled),
            ("a test image's codes", encoded))]
    names = ", ".join(classes[int(c)] for c in labels)
    figures.save_image_rows(args.out, rows, f"Decoded {shape[0]}x{shape[1]} maps of codes: uniform random codes "
                                            f"(top), the class-conditional PixelCNN prior's samples (middle),\n"
                                            f"a test image's codes (bottom); columns: {names}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
