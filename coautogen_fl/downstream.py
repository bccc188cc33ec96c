"""Downstream evaluation: train a classifier on synthetic images, test it on real ones.

Images are float32 numpy arrays in [0, 1], shape (N, H, W) or (N, H, W, C), labels int (N,):
the layout the generators produce, so callers never handle torch tensors themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


def _build_cnn(num_classes: int, channels: int, image_size: int) -> nn.Module:
    # Two conv/pool stages halve the side twice, hence image_size // 4 at the Linear.
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * side * side, num_classes),
    )


def _build_resnet18(num_classes: int, channels: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18  # lazy: torchvision import is slow

    model = resnet18(weights=None, num_classes=num_classes)
    if image_size < 64:
        # The ImageNet stem (7x7 stride 2 + maxpool) would shrink 28 px to 7 px
        # before the first block; a 3x3 stride-1 stem keeps small images usable.
        model.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def pretrained_weights(pretrained: bool, model: str, weights: str = "") -> Path | None:
    """The ImageNet weights file ``-cmp`` will load (resnet18 only; None otherwise). Raises the
    embedder's error, naming the file and the fix, when it is missing: checked before a run starts."""
    if not (pretrained and model == "resnet18"):
        return None
    from .embedding.resnet import resolve_resnet18_weights

    return resolve_resnet18_weights(weights, "downstream.weights", "run without -cmp (downstream.pretrained=false)")


def load_imagenet_weights(model: nn.Module, weights: str = "") -> list[str]:
    """``-cmp``: copy ImageNet ResNet-18 weights into ``model`` wherever the shapes match (the stem
    and the head are this project's own sizes and stay as built). ``weights`` is a local file, or
    "" for torchvision's cache; nothing is downloaded. Returns the keys that were not copied."""
    path = pretrained_weights(True, "resnet18", weights)
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ValueError("the ImageNet ResNet-18 weights match no tensor of this model: -cmp needs -cmodel resnet18")
    model.load_state_dict(matching, strict=False)
    return sorted(set(own) - set(matching))


def fix_encoder(model: nn.Module) -> None:
    """``-cef``: freeze every parameter but those of the last Linear layer (the classifier head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no Linear layer to train with the encoder fixed")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in linears[-1].parameters():
        p.requires_grad_(True)


#: Registry of classifier builders: name -> builder(num_classes, channels, image_size).
CLASSIFIERS: dict[str, Callable[[int, int, int], nn.Module]] = {"cnn": _build_cnn, "resnet18": _build_resnet18}


def build_classifier(
    name: str, num_classes: int, channels: int = 1, image_size: int = 28, *, seed: int | None = None
) -> nn.Module:
    """Build an untrained classifier from the registry.

    Parameters
    ----------
    name : str
        A key of ``CLASSIFIERS``: "cnn" (the project default) or "resnet18".
    num_classes : int
        Number of output logits.
    channels : int, default 1
        Input channels (1 for grayscale, 3 for RGB).
    image_size : int, default 28
        Side of the (square) input images.
    seed : int or None, default None
        When given, weights are initialised under ``torch.manual_seed(seed)`` in a
        forked RNG, so the caller's global RNG state is left untouched.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the valid names) or non-positive sizes.
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; valid names: {sorted(CLASSIFIERS)}")
    if num_classes < 1 or channels < 1 or image_size < 4:
        raise ValueError(
            f"need num_classes >= 1, channels >= 1, image_size >= 4; got {num_classes}, {channels}, {image_size}"
        )
    if seed is None:
        return CLASSIFIERS[name](num_classes, channels, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLASSIFIERS[name](num_classes, channels, image_size)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert (N, H, W) or (N, H, W, C) images in [0, 1] to a normalised NCHW tensor.

    Parameters
    ----------
    images : np.ndarray
        float array in [0, 1]; the result is float32 ``(x - 0.5) / 0.5`` in [-1, 1].
    """
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif arr.ndim == 4:
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"images must have shape (N,H,W) or (N,H,W,C), got {arr.shape}")
    return (torch.from_numpy(np.ascontiguousarray(arr)) - 0.5) / 0.5


def _check_labels(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"labels/images length mismatch: {len(labels)} labels, {len(images)} images")
    if labels.dtype.kind not in "iu" and not np.all(labels == np.round(labels)):
        raise ValueError("labels must be integers")
    return labels.astype(np.int64)


def _num_outputs(model: nn.Module, sample: torch.Tensor) -> int:
    # Ask the model itself rather than trusting a caller-supplied count; eval mode
    # and no_grad keep BatchNorm statistics and the RNG untouched (callers reset the mode).
    model.eval()
    with torch.no_grad():
        out = model(sample[:1])
    return int(out.shape[-1])


#: Training examples seen (epochs x images) that ``derived_epochs`` aims at: 30 epochs of 1,000
#: images, the issue-2 protocol, and the same number of steps when the final volume is larger.
EPOCH_SAMPLES = 30_000


def derived_epochs(num_images: int, low: int = 3, high: int = 30) -> int:
    """Epochs for ``num_images`` training images (``downstream.epochs=0``): ``EPOCH_SAMPLES /
    num_images`` within [low, high], so a larger final volume costs little extra time."""
    return int(min(max(round(EPOCH_SAMPLES / max(num_images, 1)), low), high))


def augment_batch(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random small affine moves of an NCHW batch: shift up to 10 % of the side, rotation up to
    10 degrees, scale 0.9-1.1, each times ``strength``. Synthetic data is clean and centred;
    real scans are not, and a classifier trained on a few thousand images overfits the former."""
    n = x.shape[0]
    draw = lambda low, high: low + (high - low) * torch.rand(n, generator=generator)  # noqa: E731
    angle = draw(-10.0, 10.0) * strength * torch.pi / 180
    scale = 1.0 + draw(-0.1, 0.1) * strength
    shift = torch.stack([draw(-0.2, 0.2), draw(-0.2, 0.2)], 1) * strength  # grid units: side = 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    background = x.amin(dim=(1, 2, 3), keepdim=True)  # pad with each image's own background
    return nn.functional.grid_sample(x - background, grid, padding_mode="zeros", align_corners=False) + background


def train_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    augment: float = 0.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier mapping (N, C, H, W) to (N, num_classes) logits.
    images, labels : np.ndarray
        (N, H, W) or (N, H, W, C) floats in [0, 1]; (N,) integers in [0, num_classes).
    epochs : int, default 30
    lr : float, default 1e-3
    batch_size : int, default 64
    seed : int, default 0
        Seeds the batch shuffling and any stochastic layers; with the same seed
        and initial weights, CPU training is bit-for-bit reproducible.
    device : str, default "cpu"
    progress : bool, default False
        Show a tqdm bar over epochs.
    augment : float, default 0.0
        Strength of random affine augmentation (see ``augment_batch``); 0 = none.
    label_smoothing : float, default 0.0
        Cross-entropy label smoothing (hedges against the synthetic-to-real gap).

    Returns
    -------
    torch.nn.Module
        The same model, trained, on ``device``, in eval mode.

    Raises
    ------
    ValueError
        Empty data, length mismatch, or labels outside [0, num_classes).
    """
    if len(images) == 0:
        raise ValueError("cannot train on empty data (0 images)")
    y_np = _check_labels(images, labels)
    x = images_to_tensor(images).to(device)
    y = torch.from_numpy(y_np).to(device)
    model.to(device)
    num_classes = _num_outputs(model, x)
    if y_np.min() < 0 or y_np.max() >= num_classes:
        raise ValueError(f"labels outside [0, {num_classes}): min {y_np.min()}, max {y_np.max()}")
    # A private generator keeps shuffling reproducible whatever else uses the global RNG.
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)  # -cef: the head only
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    bar = tqdm(range(epochs), desc="train", disable=not progress, leave=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # covers dropout-like layers without touching the caller's RNG
        model.train()
        for _ in bar:
            order = torch.randperm(len(x), generator=gen).to(device)
            total = 0.0
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                batch = augment_batch(x[idx], gen, augment) if augment > 0 else x[idx]
                loss = loss_fn(model(batch), y[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{total / len(x):.4f}")
    model.eval()
    return model


def evaluate_classifier(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, device: str = "cpu", batch_size: int = 256
) -> tuple[float, int]:
    """Return ``(accuracy, count)`` of ``model`` on labelled images; ``(0.0, 0)`` if empty.

    Parameters
    ----------
    model : torch.nn.Module
    images, labels : np.ndarray
        (N, H, W) or (N, H, W, C) floats in [0, 1]; (N,) integers.
    device : str, default "cpu"
    batch_size : int, default 256
    """
    if len(images) == 0:
        return 0.0, 0
    y = torch.from_numpy(_check_labels(images, labels))
    x = images_to_tensor(images)
    model.to(device)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size].to(device))
            correct += int((logits.argmax(dim=1).cpu() == y[start : start + batch_size]).sum())
    return correct / len(x), len(x)


def predict_probabilities(
    model: nn.Module, images: np.ndarray, *, device: str = "cpu", batch_size: int = 256
) -> np.ndarray:
    """Softmax outputs of ``model`` on ``images``, float64 (N, num_classes); (0, 0) if empty."""
    if len(images) == 0:
        return np.zeros((0, 0))
    x = images_to_tensor(images)
    model.to(device)
    model.eval()
    with torch.no_grad():
        chunks = [
            torch.softmax(model(x[i : i + batch_size].to(device)), dim=1).cpu() for i in range(0, len(x), batch_size)
        ]
    return torch.cat(chunks).double().numpy()


def class_errors(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int, *, device: str = "cpu"
) -> np.ndarray:
    """Misclassified images of ``model`` per true class, float64 (num_classes,).

    One image adds at most 1 to one entry: the vector's L2 sensitivity to one image is 1.
    """
    if len(images) == 0:
        return np.zeros(num_classes)
    y = _check_labels(images, labels)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels outside [0, {num_classes}): min {y.min()}, max {y.max()}")
    wrong = predict_probabilities(model, images, device=device).argmax(axis=1) != y
    return np.bincount(y[wrong], minlength=num_classes).astype(np.float64)


def train_and_evaluate(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    augment: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[nn.Module, float]:
    """Build ``name`` under ``seed``, train it on one set and return its accuracy on another.

    Parameters
    ----------
    name : str
        Classifier name (see ``CLASSIFIERS``).
    train_images, train_labels, test_images, test_labels : np.ndarray
        Training data (typically synthetic) and evaluation data (typically real);
        channels and (square) size of the test images must match training.
    num_classes : int
    epochs, lr, batch_size, seed, device, augment, label_smoothing
        As in ``train_classifier`` (defaults 30, 1e-3, 64, 0, "cpu", 0, 0); ``seed``
        also seeds the weight initialisation.

    Returns
    -------
    tuple of (torch.nn.Module, float)
        The trained model (eval mode) and its test accuracy. Raises ValueError for
        non-square training images and whatever ``train_classifier`` rejects.
    """
    shape = np.shape(train_images)
    if len(shape) not in (3, 4) or shape[1] != shape[2]:
        raise ValueError(f"train_images must be square (N,H,H[,C]), got {shape}")
    channels = 1 if len(shape) == 3 else shape[3]
    model = build_classifier(name, num_classes, channels, shape[1], seed=seed)
    train_classifier(
        model,
        train_images,
        train_labels,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        augment=augment,
        label_smoothing=label_smoothing,
    )
    accuracy, _ = evaluate_classifier(model, test_images, test_labels, device=device)
    return model, accuracy


def state_dict_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy every parameter and buffer to a numpy array (for shipping in messages).

    The arrays are copies, so later training does not mutate arrays already handed out.
    """
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state_dict(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load arrays produced by ``state_dict_to_numpy`` into ``model`` (strict keys).

    Parameters
    ----------
    model : torch.nn.Module
        Same architecture as the model the arrays came from.
    arrays : dict of str to np.ndarray
        Every key of ``model.state_dict()``, nothing else (strict load).
    """
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
    model.load_state_dict(state, strict=True)
