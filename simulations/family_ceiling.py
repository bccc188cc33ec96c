"""What a generator family can express at best: votes without noise and without a loop.

    python -m simulations.family_ceiling [key=value ...] --draws 2000 --seeds 0 1   (overrides first)

An analysis tool, not a release: it reads the pooled private training data directly. It draws
``--draws`` candidates per class from the generator's prior, lets every private training image
vote for its nearest candidate of its own class in the embedder's space (exact counts, no noise),
and trains the downstream model on

- ``nearest``: the voted candidates themselves, one per private image (Private Evolution's
  noise-free histogram after one round over a large pool);
- ``refit``: ``feedback.volume_per_label`` per class drawn from the generator's distribution
  refitted to those counts (what ``feedback.evolve=distribution`` does with perfect votes);
- ``prior``: the same number drawn from the prior (Gen).

It prints accuracy_real_test (mean over ``--seeds`` downstream seeds) for each, so two generator
families (e.g. ``generator.glyph_style=pen`` and ``fonts``) compare on what they can express,
separately from what the loop and the noise make of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch

from coautogen_fl.config import load_config
from coautogen_fl.data import load_pool_and_test
from coautogen_fl.downstream import derived_epochs, train_and_evaluate
from coautogen_fl.embedding import build_embedder
from coautogen_fl.generation import build_generator
from coautogen_fl.generation.base import Candidate, GeneratorCapabilities, stack_images
from coautogen_fl.rater import squared_distances


def nearest_votes(private: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Index of each private embedding's nearest candidate embedding (squared L2, as the raters measure)."""
    return squared_distances(private, candidates).argmin(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.family_ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000, help="prior candidates per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="downstream seeds")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config("configs/default.yaml", overrides=args.overrides)
    pool, test = load_pool_and_test(cfg.data)
    embedder = build_embedder(cfg.embedder, "cpu")
    generator = build_generator(cfg, pool.class_names, "cpu", embedder)
    if not GeneratorCapabilities.of(generator).refit:
        parser.error(f"{cfg.generator.name} has no fit(): the refit ceiling needs a Refittable generator")
    private = embedder.embed(pool.images)
    per_label, num_classes = cfg.feedback.volume_per_label, len(pool.class_names)
    drawn = {label: generator.random(label, args.draws) for label in range(num_classes)}
    prior = [c for label in range(num_classes) for c in drawn[label][:per_label]]
    nearest: list[Candidate] = []
    for label in range(num_classes):
        votes = nearest_votes(private[pool.labels == label], embedder.embed(stack_images(drawn[label])))
        nearest += [drawn[label][i] for i in votes]
        counts = np.bincount(votes, minlength=args.draws).astype(np.float64)
        generator.fit(drawn[label], counts, 1.0, cfg.feedback.min_spread)  # type: ignore[attr-defined]
    refit = [c for label in range(num_classes) for c in generator.random(label, per_label)]
    ds = cfg.downstream
    for name, data in (("prior", prior), ("nearest", nearest), ("refit", refit)):
        accuracies = [
            train_and_evaluate(
                ds.model,
                stack_images(data),
                np.array([c.label for c in data]),
                test.images,
                test.labels,
                num_classes,
                epochs=ds.epochs or derived_epochs(len(data)),
                lr=ds.lr,
                batch_size=ds.batch_size,
                seed=seed,
                augment=ds.augment,
                label_smoothing=ds.label_smoothing,
            )[1]
            for seed in args.seeds
        ]
        print(f"{name}: {len(data)} images, accuracy_real_test {statistics.mean(accuracies):.4f} {accuracies}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
