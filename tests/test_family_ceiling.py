"""simulations/family_ceiling.py: the noise-free nearest votes the family ceiling is measured with."""

from __future__ import annotations

import numpy as np

from simulations.family_ceiling import nearest_votes


def test_each_private_embedding_votes_for_its_nearest_candidate() -> None:
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(50, 8))
    near_copies = candidates[[3, 3, 17, 42]] + 0.01 * rng.normal(size=(4, 8))
    assert nearest_votes(near_copies, candidates).tolist() == [3, 3, 17, 42]
    private = rng.normal(size=(30, 8))
    brute_force = [int(np.argmin(((candidates - p) ** 2).sum(1))) for p in private]
    assert nearest_votes(private, candidates).tolist() == brute_force
