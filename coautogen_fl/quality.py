"""How close the synthetic data is to real data, measured in an embedder's feature space.

Two measures, both on embeddings (rows of a float array), overall and per class:

- Fréchet distance (the distance behind FID, here in the run's own embedder space instead of
  Inception's): fit a Gaussian to each set and take
  ``|mu_r - mu_s|^2 + Tr(S_r + S_s - 2 (S_r S_s)^{1/2})``. 0 for identical moments; it grows with
  a shift of the mean and with a mismatch of the spread. Its scale depends on the embedder, so
  compare runs with the same embedder only.
- Precision and recall as k-NN manifold estimates (Kynkäänniemi et al., 2019, "Improved Precision
  and Recall Metric for Assessing Generative Models"): each point of a set gets a ball reaching its
  k-th nearest neighbour in the same set; the union of balls estimates the set's manifold.
  Precision is the share of synthetic points inside the real manifold (are they realistic?),
  recall the share of real points inside the synthetic manifold (is the real variety covered?).

No flwr import: the server calls :func:`quality_metrics` at the end of a run on the central real
test split (simulation only; a deployment's server holds no real data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

#: k of the k-NN manifold estimate; 3 is the value Kynkäänniemi et al. recommend.
DEFAULT_K = 3


def moments(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of the rows of ``embeddings`` (N, D), N >= 2."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"moments need at least 2 rows of shape (N, D), got {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; round-off negatives become 0."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_moments(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``Tr((S1 S2)^{1/2})`` is computed as ``Tr((A S2 A)^{1/2})`` with ``A = S1^{1/2}``: the same
    eigenvalues, but a symmetric matrix, so singular covariances (fewer samples than dimensions,
    as with a few dozen images per class) give a real, non-negative answer without the ad-hoc
    diagonal offset ``scipy.linalg.sqrtm`` needs.

    Parameters
    ----------
    mu1, mu2 : np.ndarray
        Means, shape (D,).
    sigma1, sigma2 : np.ndarray
        Covariances, shape (D, D), symmetric positive semi-definite.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"moments do not match: means {mu1.shape}, {mu2.shape}; covariances {sigma1.shape}, {sigma2.shape}"
        )
    root = _psd_sqrt(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0.0, None)).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)
    return max(distance, 0.0)  # round-off can make identical sets a hair negative


def frechet_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings (N, D) and (M, D)."""
    return frechet_distance_from_moments(*moments(real), *moments(synthetic))


def knn_radii(points: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """Distance of every point (N, D) to its k-th nearest other point of the same set, (N,).

    Asking for k + 1 neighbours makes the point itself neighbour 0 (distance 0), so column ``k``
    is the k-th nearest other point; duplicates count as other points (radius 0 is possible).
    """
    if not 1 <= k < len(points):
        raise ValueError(f"k={k} needs at least k + 1 = {k + 1} points, got {len(points)}")
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return distances[:, k]


def manifold_coverage(queries: np.ndarray, support: np.ndarray, k: int = DEFAULT_K) -> float:
    """Share of ``queries`` (M, D) inside the k-NN manifold of ``support`` (N, D): the union of
    the balls around each support point reaching its k-th nearest support neighbour."""
    radii = knn_radii(support, k)
    index = NearestNeighbors().fit(support)
    # Candidates within the largest radius, then each checked against its own support ball.
    distances, neighbours = index.radius_neighbors(queries, radius=float(radii.max()))
    inside = [bool(np.any(d <= radii[n])) for d, n in zip(distances, neighbours)]
    return float(np.mean(inside)) if inside else float("nan")


def precision_recall(real: np.ndarray, synthetic: np.ndarray, k: int = DEFAULT_K) -> tuple[float, float]:
    """(precision, recall) of ``synthetic`` against ``real`` (Kynkäänniemi et al. 2019).

    Parameters
    ----------
    real, synthetic : np.ndarray
        Embeddings, (N, D) and (M, D); each set needs more than ``k`` rows.
    k : int (default: 3)
        Neighbourhood size of the manifold estimate; larger k, larger balls, higher values.
    """
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    return manifold_coverage(synthetic, real, k), manifold_coverage(real, synthetic, k)


def _metrics(real: np.ndarray, synthetic: np.ndarray, k: int) -> dict[str, Any]:
    """The three numbers for one pair of sets; None where a set is too small to define them."""
    out: dict[str, Any] = {
        "num_real": len(real),
        "num_synthetic": len(synthetic),
        "frechet_distance": None,
        "precision": None,
        "recall": None,
    }
    if len(real) >= 2 and len(synthetic) >= 2:
        out["frechet_distance"] = frechet_distance(real, synthetic)
    if len(real) > k and len(synthetic) > k:
        out["precision"], out["recall"] = precision_recall(real, synthetic, k)
    return out


def sample_per_class(labels: np.ndarray, max_per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_per_class`` rows of every label (all of a smaller class), sorted;
    drawn without replacement by a seeded generator, so the same run gives the same sample."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        picked.append(rows if len(rows) <= max_per_class else rng.choice(rows, max_per_class, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def quality_metrics(
    real: np.ndarray,
    real_labels: np.ndarray,
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    class_names: Sequence[str],
    k: int = DEFAULT_K,
) -> dict[str, Any]:
    """Fréchet distance, precision and recall of the synthetic embeddings against the real ones,
    over all classes together and per class (JSON-ready; None where a class is too small).

    Parameters
    ----------
    real, synthetic : np.ndarray
        Embeddings (N, D) and (M, D) in the same feature space.
    real_labels, synthetic_labels : np.ndarray
        Integer labels (N,) and (M,) in ``0 .. len(class_names) - 1``.
    class_names : sequence of str
        Keys of ``per_class``, in label order.
    k : int (default: 3)
        Neighbourhood size of precision and recall.

    Returns
    -------
    dict
        ``{"k", "overall": {...}, "per_class": {name: {...}}}``, each ``{...}`` holding
        ``frechet_distance``, ``precision``, ``recall``, ``num_real``, ``num_synthetic``.
    """
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    real_labels, synthetic_labels = np.asarray(real_labels), np.asarray(synthetic_labels)
    per_class = {
        str(name): _metrics(real[real_labels == c], synthetic[synthetic_labels == c], k)
        for c, name in enumerate(class_names)
    }
    return {"k": k, "overall": _metrics(real, synthetic, k), "per_class": per_class}


#: At most this many synthetic (and real) images per class are embedded for the measures: the
#: final dataset can hold thousands per class, and the estimates settle long before that.
MAX_PER_CLASS = 1000


def measure_synthetic_data(
    embed: Any,
    real_images: np.ndarray,
    real_labels: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_labels: np.ndarray,
    class_names: Sequence[str],
    k: int = DEFAULT_K,
    max_per_class: int = MAX_PER_CLASS,
) -> dict[str, Any]:
    """:func:`quality_metrics` of synthetic images against real ones, embedded by ``embed``.

    Parameters
    ----------
    embed : callable
        Images (N, H, W[, C]) floats in [0, 1] -> embeddings (N, D); the run's embedder's ``embed``.
    real_images, real_labels, synthetic_images, synthetic_labels : np.ndarray
        The two labelled image sets.
    class_names : sequence of str
        In label order.
    k : int (default: 3)
        Neighbourhood size of precision and recall.
    max_per_class : int (default: MAX_PER_CLASS = 1000)
        Images per class and set that are embedded (a seeded sample of larger classes).

    Returns
    -------
    dict
        :func:`quality_metrics`'s dict plus ``available: True`` and ``max_per_class``.
    """
    real_keep = sample_per_class(real_labels, max_per_class)
    synthetic_keep = sample_per_class(synthetic_labels, max_per_class)
    real = np.asarray(embed(np.asarray(real_images)[real_keep]), dtype=np.float64)
    synthetic = np.asarray(embed(np.asarray(synthetic_images)[synthetic_keep]), dtype=np.float64)
    metrics = quality_metrics(
        real,
        np.asarray(real_labels)[real_keep],
        synthetic,
        np.asarray(synthetic_labels)[synthetic_keep],
        class_names,
        k,
    )
    return {"available": True, "max_per_class": max_per_class, **metrics}


def unavailable(reason: str) -> dict[str, Any]:
    """The ``quality`` entry of a run that could not measure its synthetic data, with why."""
    return {"available": False, "reason": reason}
