"""Private data: the embedded default (scikit-learn's digits) and ImageFolder directories,
a held-out central test split, and the split of the rest across sites (flwr-datasets
partitioners, a data library, so allowed in the core).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: What ``data.on_bad_image`` may say: skip an unreadable file (it is then not an image of the
#: site) or refuse to load the folder.
ON_BAD_IMAGE = ("skip", "error")
#: What Pillow raises for a file it cannot decode (corrupt, truncated, a decompression bomb).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """The private data cannot be loaded or split; the message names the fix."""


class DataFolderError(DataError):
    """The data folder itself is missing, empty or not an ImageFolder: a configuration error of
    the operator (a layout problem, not a property of any one image). The message is one line
    and names the config key that points at the folder."""


@dataclass
class FolderReport:
    """What loading an ImageFolder found besides the images: for the operator's eyes only (the
    site's own log, the simulation preflight), never for the wire.

    Attributes
    ----------
    root : Path
        The folder.
    class_counts : dict
        Readable images per class folder (sorted by name; 0 for an empty class).
    skipped : list of (Path, str)
        Unreadable files skipped under ``data.on_bad_image=skip``, with the reason.
    nested : int
        Images found below a class folder's sub-folders (counted under their class folder).
    stray : list of Path
        Image files directly in ``root``, in no class folder: ignored.
    other_suffixes : dict
        Files in class folders that are not images by suffix, per suffix: ignored.
    """

    root: Path
    class_counts: dict[str, int]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    nested: int = 0
    stray: list[Path] = field(default_factory=list)
    other_suffixes: dict[str, int] = field(default_factory=dict)

    @property
    def small_classes(self) -> dict[str, int]:
        """Classes with fewer than 2 readable images (an empty class included)."""
        return {name: n for name, n in self.class_counts.items() if n < 2}

    def problems(self) -> list[str]:
        """One line per thing the operator should fix: unreadable files, small classes, stray files."""
        lines = []
        if self.skipped:
            lines.append(f"{len(self.skipped)} unreadable image file(s) skipped (data.on_bad_image=skip):")
            lines += [f"  {path} ({reason})" for path, reason in self.skipped]
        for name, n in self.small_classes.items():
            what = "holds no readable images" if n == 0 else "holds 1 readable image (fewer than 2)"
            lines.append(f"class {name!r} {what}")
        if self.stray:
            lines.append(f"{len(self.stray)} image file(s) directly in {self.root}, in no class folder, ignored:")
            lines += [f"  {path}" for path in self.stray]
        return lines

    def notes(self) -> list[str]:
        """Lines worth knowing that need no fix."""
        lines = []
        if self.nested:
            lines.append(
                f"{self.nested} image(s) found in sub-folders of class folders, each counted under its class folder"
            )
        if self.other_suffixes:
            found = ", ".join(f"{suffix or '(none)'} x{n}" for suffix, n in sorted(self.other_suffixes.items()))
            lines.append(f"files that are not {'/'.join(IMAGE_SUFFIXES)} ignored: {found}")
        return lines

    def lines(self) -> list[str]:
        """Everything found, problems first; empty when there is nothing to say."""
        return self.problems() + self.notes()


@dataclass
class ImageSet:
    """Images (float32 in [0, 1], (N, H, W) or (N, H, W, C)) with integer labels."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    #: What loading a folder found (None for the bundled digits and for subsets).
    report: FolderReport | None = field(default=None, compare=False, repr=False)

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
    #: What loading the site's folder found (None when the site's data is a share of a pool).
    report: FolderReport | None = None


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
    with Image.open(path) as image:
        return _resize(image, image_size, channels)


def _image_files(folder: Path, seen: set[Path], report: FolderReport, depth: int = 0) -> Iterator[Path]:
    """The image files of one class folder and, recursively, of its sub-folders (sorted by name;
    hidden files and folders skipped; a folder reached twice through symbolic links walked once)."""
    real = folder.resolve()
    if real in seen:
        return
    seen.add(real)
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _image_files(entry, seen, report, depth + 1)
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            report.nested += int(depth > 0)
            yield entry
        elif entry.is_file():
            suffix = entry.suffix.lower()
            report.other_suffixes[suffix] = report.other_suffixes.get(suffix, 0) + 1


def scan_image_folder(
    root: str | Path, key: str = "data.name (or -cdata)"
) -> tuple[list[Path], list[tuple[int, Path]], FolderReport]:
    """(class folders, (label, file) of every image file, the report so far) of an ImageFolder,
    without decoding anything.

    Images in sub-folders of a class folder (``root/<class>/<sub>/x.png``) belong to that class,
    as in torchvision's ``ImageFolder``; the report counts them. Raises :class:`DataFolderError`
    (one line naming ``key``) when the folder is missing, has fewer than two class folders or
    holds no image file at all.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataFolderError(
            f"data folder not found: {folder} (set by {key}); point {key} at a directory laid out as "
            "<root>/<class_name>/*.png"
        )
    class_dirs = sorted(
        (d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )
    report = FolderReport(folder, {d.name: 0 for d in class_dirs})
    report.stray = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    seen: set[Path] = set()
    files = [(label, f) for label, d in enumerate(class_dirs) for f in _image_files(d, seen, report)]
    if len(class_dirs) < 2 or not files:
        raise DataFolderError(
            f"{folder} (set by {key}) holds {len(class_dirs)} class folders and {len(files)} images; an "
            f"ImageFolder needs at least two <class_name>/ sub-folders with {'/'.join(IMAGE_SUFFIXES)} images"
        )
    return class_dirs, files, report


def load_image_folder(
    root: str | Path,
    image_size: int = 28,
    channels: int = 1,
    on_bad_image: str = "skip",
    key: str = "data.name (or -cdata)",
) -> ImageSet:
    """An ImageFolder directory: ``root/<class_name>/**/*.png|jpg``; classes sorted by name.

    Every file is decoded in one pass. An unreadable one (corrupt, truncated) is skipped and
    listed in the returned set's :attr:`ImageSet.report` under ``on_bad_image="skip"``: it is
    then simply not an image of this folder (roles are keyed per image, so no other image
    changes). Under ``"error"`` all unreadable files are listed in one :class:`DataError`.
    ``key`` is the config key that named the folder, for the messages (``data.name`` in a
    simulation, ``data-path`` for a site's node config).
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image={on_bad_image!r}; choose one of {', '.join(ON_BAD_IMAGE)}")
    class_dirs, files, report = scan_image_folder(root, key)
    images, labels = [], []
    for label, path in files:
        try:
            images.append(_read_image(path, image_size, channels))
        except _DECODE_ERRORS as exc:
            report.skipped.append((path, f"{exc.__class__.__name__}: {exc}"))
            continue
        labels.append(label)
        report.class_counts[class_dirs[label].name] += 1
    if report.skipped and on_bad_image == "error":
        listed = "; ".join(f"{path} ({reason})" for path, reason in report.skipped)
        raise DataError(
            f"cannot read {len(report.skipped)} image file(s) under {report.root} (data.on_bad_image=error): {listed}. "
            "Remove or replace them, or set data.on_bad_image=skip"
        )
    if not images:
        listed = "; ".join(f"{path} ({reason})" for path, reason in report.skipped)
        raise DataError(
            f"none of the {len(files)} image files under {report.root} (set by {key}) can be read: {listed}"
        )
    return ImageSet(np.stack(images), np.array(labels, dtype=np.int64), tuple(d.name for d in class_dirs), report)


def load_real_dataset(cfg: DataConfig) -> ImageSet:
    """The private data named by ``data.name``: "digits" or an ImageFolder path ("digits-shifted",
    the scale workload, is the digits here; :func:`load_pool_and_test` shifts its pool)."""
    if cfg.name in ("digits", "digits-shifted"):
        return load_digits_dataset(cfg.image_size, cfg.channels)
    return load_image_folder(cfg.name, cfg.image_size, cfg.channels, cfg.on_bad_image, key="data.name (or -cdata)")


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


#: Partitioners built in this process, by (labels digest, sites, partitioner, alpha, seed): a
#: simulation process serves many sites of one pool, and building the table is the slow part.
_PARTITIONERS: dict[tuple, Any] = {}


def partition_indices(labels: np.ndarray, num_partitions: int, cfg: DataConfig, partition_id: int) -> np.ndarray:
    """Indices of site ``partition_id``'s share of the private pool (flwr-datasets partitioners)."""
    key = (
        hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(),
        num_partitions,
        cfg.partitioner,
        cfg.dirichlet_alpha,
        cfg.seed,
    )
    if key not in _PARTITIONERS:
        _PARTITIONERS.clear()  # one pool at a time
        _PARTITIONERS[key] = _partitioner(labels, num_partitions, cfg)
    try:
        return np.array(_PARTITIONERS[key].load_partition(partition_id)["index"], dtype=np.int64)
    except (IndexError, ValueError) as exc:
        raise DataError(
            f"cannot split {labels.shape[0]} private images across {num_partitions} sites ({exc}). "
            "Use fewer hospitals (federation.num_hospitals) or more data"
        ) from None


def _partitioner(labels: np.ndarray, num_partitions: int, cfg: DataConfig) -> Any:
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
    return partitioner


def keyed_uniforms(data: ImageSet, key: bytes) -> np.ndarray:
    """One number in [0, 1) per image: HMAC-SHA256 of the site's secret key over the image's
    label and pixels. It depends on that image alone, and without the key nobody can predict it."""
    values = np.empty(len(data), dtype=np.float64)
    for i in range(len(data)):
        message = (
            int(data.labels[i]).to_bytes(8, "little", signed=True) + np.ascontiguousarray(data.images[i]).tobytes()
        )
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
        kept = [
            members[np.argsort(u[members], kind="stable")[:cap]]
            for members in (voters[data.labels[voters] == label] for label in np.unique(data.labels[voters]))
        ]
        voters = np.sort(np.concatenate(kept)) if kept else voters[:0]
    return voters, test


def split_site(data: ImageSet, cfg: DataConfig, key: bytes, partition_id: int) -> SitePartition:
    """A site's private train (voting) and test splits by :func:`assign_roles`."""
    voters, test = assign_roles(data, key, cfg.site_test_fraction, cfg.real_per_label)
    return SitePartition(train=data.subset(voters), test=data.subset(test), partition_id=partition_id)


def site_partition(
    pool: ImageSet, partition_id: int, num_partitions: int, cfg: DataConfig, key: bytes
) -> SitePartition:
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


#: ``data.name=digits-shifted``: every private digit appears this many times, shifted.
SHIFTED_COPIES = 40
#: ... by up to this many pixels each way (of the data.image_size image).
MAX_SHIFT = 2


def shifted_copies(data: ImageSet, copies: int = SHIFTED_COPIES, max_shift: int = MAX_SHIFT, seed: int = 0) -> ImageSet:
    """A scale workload: each image ``copies`` times, moved by a random whole-pixel shift in
    [-max_shift, max_shift]^2 (zero fill; a fixed public seed: this is the data, not noise)."""
    rng = np.random.default_rng(seed)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(len(data), copies, 2))
    size = data.images.shape[1]
    padded = np.pad(
        data.images, [(0, 0), (max_shift, max_shift), (max_shift, max_shift)] + [(0, 0)] * (data.images.ndim - 3)
    )
    out = np.empty((len(data) * copies, *data.images.shape[1:]), dtype=data.images.dtype)
    for c in range(copies):
        for i, (dy, dx) in enumerate(shifts[:, c]):
            y, x = max_shift - dy, max_shift - dx
            out[c * len(data) + i] = padded[i, y : y + size, x : x + size]
    return ImageSet(out, np.tile(data.labels, copies), data.class_names)


@lru_cache(maxsize=4)
def _cached_pool(cfg_key: tuple) -> tuple[ImageSet, ImageSet]:
    cfg = DataConfig(*cfg_key)
    if cfg.name == "digits-shifted":  # the test split stays the 540 original digits: no shifted twin in it
        pool, test = central_split(load_digits_dataset(cfg.image_size, cfg.channels), cfg)
        return shifted_copies(pool), test
    data = load_real_dataset(cfg)
    pool, test = central_split(data, cfg)
    pool.report = data.report  # the folder's report, for the preflight and the sites' logs
    return pool, test


def load_pool_and_test(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """Load and split once per process (sites and server reuse it across rounds)."""
    return _cached_pool(tuple(getattr(cfg, f) for f in cfg.__dataclass_fields__))


def load_site_from_folder(root: str | os.PathLike, cfg: DataConfig, partition_id: int, key: bytes) -> SitePartition:
    """A real deployment: the site's own ImageFolder (node config ``data-path``); the partition
    carries the folder's :class:`FolderReport` for the site's own log."""
    data = load_image_folder(root, cfg.image_size, cfg.channels, cfg.on_bad_image, key="node config data-path")
    site = split_site(data, cfg, key, partition_id)
    site.report = data.report
    return site
