"""An in-process replica of the Feedback loop, for tuning (no Flower, no ledgers, no run directory).

    python -m simulations.replica [key=value ...] --seeds 0 1 2 --eps 1 [-f Gen]

The same core code as a `coautogen run` (data split, site roles, embedder, generator, evolution,
rater, calibrated noise, downstream training) in one process, so a setting can be compared over
several seeds in a minute or two. The local-mode noise here is drawn with numpy (a tuning tool
releases nothing); the product path is `coautogen run`, whose numbers the benchmark harness
reports. Prints accuracy_real_test per seed and the mean.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from coautogen_fl.config import RunConfig, load_config
from coautogen_fl.data import load_pool_and_test, site_partition
from coautogen_fl.downstream import derived_epochs, train_and_evaluate
from coautogen_fl.embedding import build_embedder
from coautogen_fl.evolution import Evolution
from coautogen_fl.generation import build_generator
from coautogen_fl.generation.base import Candidate, stack_images
from coautogen_fl.generation.schedule import DegreeSchedule
from coautogen_fl.privacy import aggregate_noise_std, noise_multiplier_for_epsilon
from coautogen_fl.rater import SIGNED_RATERS, vote_histogram, vote_sensitivity


def evolve(cfg: RunConfig, evolution: Evolution, site_sets: list, embedder) -> list[Candidate]:
    """The voting rounds with calibrated Gaussian noise (local or central); the final dataset."""
    rounds = cfg.feedback.rounds
    releases = rounds + (1 if cfg.privacy.evaluation == "noised" else 0)
    sigma = noise_multiplier_for_epsilon(cfg.privacy.epsilon, cfg.privacy.delta, releases)
    sensitivity = vote_sensitivity(cfg.privacy.unit, cfg.data.real_per_label > 0, cfg.feedback.rater in SIGNED_RATERS)
    std = sigma * sensitivity
    private = [(embedder.embed(s.images), s.labels) for s in site_sets]
    local = cfg.privacy.mode == "local"
    evolution.start()
    for server_round in range(1, rounds + 1):
        embeddings, labels = evolution.payload()
        total = np.zeros(len(labels))
        for site_embeddings, site_labels in private:
            votes = vote_histogram(site_embeddings, site_labels, embeddings.astype(np.float32), labels, cfg.feedback.k)
            total += votes + (np.random.normal(0.0, std, votes.shape) if local else 0.0)
        if not local:
            total += np.random.normal(0.0, std, total.shape)
        last = server_round == rounds
        per_label = cfg.feedback.volume_per_label if last else cfg.feedback.candidates_per_label
        aggregate_std = aggregate_noise_std(sigma, sensitivity, len(private), cfg.privacy.mode)
        evolution.advance(server_round, total, aggregate_std, per_label)
    return evolution.pool


def run(overrides: list[str], seed: int) -> tuple[float, float]:
    """accuracy_real_test and seconds of one replica run."""
    started = time.time()
    cfg = load_config(
        "configs/default.yaml", overrides=[f"generator.seed={seed}", f"downstream.seed={seed}", *overrides]
    )
    pool, test = load_pool_and_test(cfg.data)
    n = cfg.federation.num_hospitals
    sites = [site_partition(pool, i, n, cfg.data, os.urandom(32)).train for i in range(n)]
    embedder = build_embedder(cfg.embedder, "cpu")
    generator = build_generator(cfg, pool.class_names, "cpu", embedder)
    g = cfg.generator
    evolution = Evolution(
        generator,
        embedder,
        len(pool.class_names),
        cfg.feedback,
        DegreeSchedule(g.degree_start, g.degree_end, g.degree_step),
        g.seed,
    )
    if cfg.feedback.framework == "Feedback":
        final = evolve(cfg, evolution, sites, embedder)
    else:
        final = evolution.random_population(cfg.feedback.volume_per_label)
    images, labels = stack_images(final), np.array([c.label for c in final])
    ds = cfg.downstream
    _, accuracy = train_and_evaluate(
        ds.model,
        images,
        labels,
        test.images,
        test.labels,
        len(pool.class_names),
        epochs=ds.epochs or derived_epochs(len(final)),
        lr=ds.lr,
        batch_size=ds.batch_size,
        seed=ds.seed,
        augment=ds.augment,
        label_smoothing=ds.label_smoothing,
    )
    return accuracy, time.time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.replica", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eps", type=float, default=1.0, help="privacy.epsilon")
    parser.add_argument("-f", "--framework", default="Feedback", choices=["Feedback", "Gen"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = [f"privacy.epsilon={args.eps}", f"feedback.framework={args.framework}", *args.overrides]
    accuracies = []
    for seed in args.seeds:
        accuracy, seconds = run(overrides, seed)
        accuracies.append(accuracy)
        print(f"seed {seed}: accuracy_real_test {accuracy:.4f} ({seconds:.0f} s)", flush=True)
    print(f"mean {statistics.mean(accuracies):.4f} over {len(accuracies)} seeds: {' '.join(overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
