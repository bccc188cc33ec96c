"""Private data: the embedded default (scikit-learn's digits) and ImageFolder directories,
a held-out central test split, and the split of the rest across sites (flwr-datasets
partitioners, a data library, so allowed in the core).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(ValueError):
    """The private data cannot be loaded or split; the message names the fix."""


@dataclass
class ImageSet:
    """Images (float32 in [0, 1], (N, H, W) or (N, H, W, C)) with integer labels."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[indices], self.labels[indices], self.class_names)


@dataclass
class SitePartition:
    """What one site holds: a private train split (it votes with) and a private test split."""

    train: ImageSet
    test: ImageSet
    partition_id: int


def _resize(image: Image.Image, size: int, channels: int) -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    resized = image.convert(mode).resize((size, size), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def load_digits_dataset(image_size: int = 28, channels: int = 1) -> ImageSet:
    """scikit-learn's bundled 1,797 handwritten digits (8x8, ink bright), upscaled bilinearly."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    images = np.stack([_resize(Image.fromarray(s), image_size, channels) for s in scans])
    names = tuple(str(n) for n in digits.target_names)
    return ImageSet(images, digits.target.astype(np.int64), names)


def _read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return _resize(image, image_size, channels)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(
            f"cannot read image {path} ({exc.__class__.__name__}: {exc}). "
            "Remove or replace the file, then run again"
        ) from None


def load_image_folder(root: str | Path, image_size: int = 28, channels: int = 1) -> ImageSet:
    """An ImageFolder directory: ``root/<class_name>/*.png|jpg``; classes sorted by name."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"data folder not found: {folder}. Set data.name (or -cdata) to 'digits' or to a "
            "directory laid out as <root>/<class_name>/*.png"
        )
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [
        (label, f)
        for label, d in enumerate(class_dirs)
        for f in sorted(d.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if len(class_dirs) < 2 or not files:
        raise DataError(
            f"{folder} holds {len(class_dirs)} class folders and {len(files)} images; an "
            "ImageFolder needs at least two <class_name>/ sub-folders with .png/.jpg images"
        )
    images = np.stack([_read_image(f, image_size, channels) for _, f in files])
    labels = np.array([label for label, _ in files], dtype=np.int64)
    return ImageSet(images, labels, tuple(d.name for d in class_dirs))


def load_real_dataset(cfg: DataConfig) -> ImageSet:
    """The private data named by ``data.name``: "digits" or an ImageFolder path."""
    if cfg.name == "digits":
        return load_digits_dataset(cfg.image_size, cfg.channels)
    return load_image_folder(cfg.name, cfg.image_size, cfg.channels)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(labels.shape[0])
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and len(labels) * test_fraction >= len(counts) else None
    return train_test_split(indices, test_size=test_fraction, stratify=stratify, random_state=seed)


def central_split(data: ImageSet, cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """(private pool divided among sites, central real test split).

    The embedded default's split is ``train_test_split(test_size=0.3, stratify=y,
    random_state=0)``, the protocol the reference numbers were measured with.
    """
    pool, test = _stratified_split(data.labels, cfg.test_fraction, cfg.seed)
    return data.subset(np.sort(pool)), data.subset(np.sort(test))


def partition_indices(labels: np.ndarray, num_partitions: int, cfg: DataConfig, partition_id: int) -> np.ndarray:
    """Indices of site ``partition_id``'s share of the private pool (flwr-datasets partitioners)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(labels.shape[0])  # IidPartitioner shards in order: shuffle first
    table = Dataset.from_dict({"label": labels[order].tolist(), "index": order.tolist()})
    if cfg.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=cfg.dirichlet_alpha,
            min_partition_size=0,
            self_balancing=False,
            seed=cfg.seed,
        )
    partitioner.dataset = table
    try:
        return np.array(partitioner.load_partition(partition_id)["index"], dtype=np.int64)
    except (IndexError, ValueError) as exc:
        raise DataError(
            f"cannot split {labels.shape[0]} private images across {num_partitions} sites ({exc}). "
            "Use fewer hospitals (federation.num_hospitals) or more data"
        ) from None


def keyed_uniforms(data: ImageSet, key: bytes) -> np.ndarray:
    """One number in [0, 1) per image: HMAC-SHA256 of the site's secret key over the image's
    label and pixels. It depends on that image alone, and without the key nobody can predict it."""
    values = np.empty(len(data), dtype=np.float64)
    for i in range(len(data)):
        message = int(data.labels[i]).to_bytes(8, "little", signed=True) + np.ascontiguousarray(data.images[i]).tobytes()
        digest = hmac.new(key, message, hashlib.sha256).digest()
        values[i] = int.from_bytes(digest[:7], "little") / float(1 << 56)
    return values


def assign_roles(data: ImageSet, key: bytes, test_fraction: float, cap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(voter indices, test indices) of a site's images, each image's role set by its own keyed
    hash: it is a site-test image when its number is below ``test_fraction``, a voter otherwise.

    Adding or removing one image therefore moves no other image between roles (a stratified
    split over the whole folder would, and so break the per-image sensitivity of the votes).
    ``cap`` > 0 keeps, per label, the ``cap`` voters with the smallest numbers (-rvpl): there one
    added image can push out one other voter, which the vote sensitivity accounts for
    (:func:`coautogen_fl.rater.vote_sensitivity`).
    """
    u = keyed_uniforms(data, key)
    test = np.flatnonzero(u < test_fraction)
    voters = np.flatnonzero(u >= test_fraction)
    if cap > 0:
        kept = [members[np.argsort(u[members], kind="stable")[:cap]] for members in
                (voters[data.labels[voters] == label] for label in np.unique(data.labels[voters]))]
        voters = np.sort(np.concatenate(kept)) if kept else voters[:0]
    return voters, test


def split_site(data: ImageSet, cfg: DataConfig, key: bytes, partition_id: int) -> SitePartition:
    """A site's private train (voting) and test splits by :func:`assign_roles`."""
    voters, test = assign_roles(data, key, cfg.site_test_fraction, cfg.real_per_label)
    return SitePartition(train=data.subset(voters), test=data.subset(test), partition_id=partition_id)


def site_partition(pool: ImageSet, partition_id: int, num_partitions: int, cfg: DataConfig, key: bytes) -> SitePartition:
    """Site ``partition_id``'s private train and test splits of the pool (roles keyed by ``key``)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside [0, {num_partitions}); check the node config")
    share = pool.subset(partition_indices(pool.labels, num_partitions, cfg, partition_id))
    if len(share) < 2:
        raise DataError(
            f"site {partition_id} holds {len(share)} private images, too few to vote and evaluate. "
            "Use fewer hospitals (federation.num_hospitals), data.partitioner=iid or a larger "
            "data.dirichlet_alpha"
        )
    return split_site(share, cfg, key, partition_id)


@lru_cache(maxsize=4)
def _cached_pool(cfg_key: tuple) -> tuple[ImageSet, ImageSet]:
    cfg = DataConfig(*cfg_key)
    return central_split(load_real_dataset(cfg), cfg)


def load_pool_and_test(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """Load and split once per process (sites and server reuse it across rounds)."""
    return _cached_pool(tuple(getattr(cfg, f) for f in cfg.__dataclass_fields__))


def load_site_from_folder(root: str | os.PathLike, cfg: DataConfig, partition_id: int, key: bytes) -> SitePartition:
    """A real deployment: the site's own ImageFolder (node config ``data-path``)."""
    return split_site(load_image_folder(root, cfg.image_size, cfg.channels), cfg, key, partition_id)
