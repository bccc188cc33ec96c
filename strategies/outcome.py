"""The end of a run on the server: store the final dataset, train the downstream model on
it, evaluate it on the central real test split, and keep what the summary reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import log

from coautogen_fl.config import RunConfig
from coautogen_fl.data import ImageSet
from coautogen_fl.downstream import (
    build_classifier,
    derived_epochs,
    evaluate_classifier,
    fix_encoder,
    load_imagenet_weights,
    state_dict_to_numpy,
    train_classifier,
)
from coautogen_fl.generation.base import Candidate, stack_images
from coautogen_fl.quality import measure_synthetic_data, unavailable
from coautogen_fl.store import SyntheticStore
from coautogen_fl.tracking import RunTracker


@dataclass
class FinalStage:
    """Server-side outputs of a run.

    Parameters
    ----------
    cfg : RunConfig
        The run configuration (downstream model, device, data shape).
    class_names : sequence of str
        Class names in label order.
    store : SyntheticStore
        Where rounds and the final dataset are written.
    tracker : RunTracker
        metrics.jsonl and Weights & Biases.
    real_test : ImageSet or None
        The central real test split (simulation); None when the server holds no real data.
    device : str
        Torch device for downstream training.
    upscaler : stage or None
        Applied to the final dataset before it is stored (``postprocess.upscale_on=final``).
    embedder : Embedder or None
        The run's embedder: the final dataset's quality (coautogen_fl/quality.py) is measured in
        its space against ``real_test``; None skips the measure.
    """

    cfg: RunConfig
    class_names: Sequence[str]
    store: SyntheticStore
    tracker: RunTracker
    real_test: ImageSet | None
    device: str = "cpu"
    upscaler: Any = None
    embedder: Any = None
    quality: dict[str, Any] | None = None  # summary.json "quality"; None until finish()
    model_arrays: ArrayRecord | None = None
    accuracy_real_test: float | None = None
    num_synthetic: int = 0
    synthetic: tuple[np.ndarray, np.ndarray] | None = None  # the final dataset's (images, labels), for -tt mix

    def log_round(self, server_round: int, metrics: dict[str, Any], voted: Sequence[Candidate]) -> None:
        """Append the round to metrics.jsonl / W&B with a grid of the voted pool."""
        self.tracker.log_round(server_round, metrics)
        images = stack_images(voted)
        labels = np.array([c.label for c in voted])
        order = np.argsort([-(c.votes or 0.0) for c in voted], kind="stable")  # best voted first
        self.tracker.log_image_grid("pool", images[order], labels[order], self.class_names, server_round)

    def model_spec(self) -> dict[str, Any]:
        """What a site needs to rebuild the downstream model (fields of an EvaluationRequest)."""
        d = self.cfg.data
        return {
            "model": self.cfg.downstream.model,
            "num_classes": len(self.class_names),
            "channels": d.channels,
            "image_size": d.image_size,
        }

    def train_model(self, images: np.ndarray, labels: np.ndarray, epochs: int) -> Any:
        """The downstream model (``downstream.*``: -cmodel, -cmp, -cef, optimiser, augmentation) trained
        on ``images`` for ``epochs``: the final model, and -f Active's model of each round."""
        ds, d = self.cfg.downstream, self.cfg.data
        model = build_classifier(ds.model, len(self.class_names), d.channels, d.image_size, seed=ds.seed)
        if ds.pretrained and ds.model == "resnet18":
            fresh = load_imagenet_weights(model, ds.weights)
            log(
                INFO,
                "downstream %s starts from ImageNet weights (%d tensors of its own size stay fresh)",
                ds.model,
                len(fresh),
            )
        if ds.encoder_fixed:
            fix_encoder(model)
        model = train_classifier(
            model,
            images,
            labels,
            epochs=epochs,
            lr=ds.lr,
            batch_size=ds.batch_size,
            seed=ds.seed,
            device=self.device,
            augment=ds.augment,
            label_smoothing=ds.label_smoothing,
        )
        return model

    def keep_dataset(self, final: list[Candidate], server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """Write the final dataset and keep it (:attr:`synthetic`, its quality); (images, labels).

        The first half of :meth:`finish`; a resumed ``-tt mix`` run past its vote rounds needs
        only this (its DP-SGD rounds take public steps on the dataset, and its model is saved)."""
        if self.upscaler is not None:
            log(INFO, "upscaling the final dataset (%d images) with %s", len(final), self.cfg.postprocess.upscaler)
            final = self.upscaler.apply(final)
        self.store.write_final(final)
        self.num_synthetic = len(final)
        images = stack_images(final)
        labels = np.array([c.label for c in final], dtype=np.int64)
        self.synthetic = (images, labels)
        self.tracker.log_image_grid("synthetic", images, labels, self.class_names, server_round)
        self.quality = self.measure_quality(images, labels)
        return images, labels

    def finish(self, final: list[Candidate], server_round: int) -> ArrayRecord:
        """Write the final dataset, train the downstream model on it, evaluate centrally."""
        images, labels = self.keep_dataset(final, server_round)
        ds = self.cfg.downstream
        epochs = ds.epochs or derived_epochs(len(images))
        log(INFO, "training the downstream %s on %d synthetic images (%d epochs)", ds.model, len(images), epochs)
        model = self.train_model(images, labels, epochs)
        if self.real_test is not None and len(self.real_test):
            self.accuracy_real_test, _ = evaluate_classifier(
                model, self.real_test.images, self.real_test.labels, device=self.device
            )
            log(INFO, "downstream accuracy on the central real test split: %.4f", self.accuracy_real_test)
        arrays = {name: Array(value) for name, value in state_dict_to_numpy(model).items()}
        self.model_arrays = ArrayRecord(arrays)
        return self.model_arrays

    def measure_quality(self, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Fréchet distance and precision/recall of the final dataset against the central real
        test split in the embedder's space; says why not when the server holds no real data."""
        if self.real_test is None or not len(self.real_test):
            return unavailable(
                "the server holds no real test data (a deployment): nothing to compare the synthetic data with"
            )
        if self.embedder is None:
            return unavailable("no embedder was given to the final stage")
        try:
            quality = measure_synthetic_data(
                self.embedder.embed, self.real_test.images, self.real_test.labels, images, labels, self.class_names
            )
        except Exception as exc:  # a diagnostic: it must not fail a run whose dataset is already stored
            log(WARNING, "the synthetic data's quality could not be measured: %s", exc)
            return unavailable(f"could not be measured: {type(exc).__name__}: {exc}")
        overall = quality["overall"]
        log(
            INFO,
            "synthetic data vs the central real test split (%s space): Fréchet distance %s, precision %s, recall %s",
            getattr(self.embedder, "name", "embedder"),
            overall["frechet_distance"],
            overall["precision"],
            overall["recall"],
        )
        self.tracker.log_final("quality", quality)
        return quality

    def adopt(self, model: Any) -> ArrayRecord:
        """Make a model trained elsewhere (the DP-SGD rounds of -tt real/mix) the run's downstream
        model: evaluated on the central real test split, then sent to the sites' evaluation."""
        if self.real_test is not None and len(self.real_test):
            self.accuracy_real_test, _ = evaluate_classifier(
                model, self.real_test.images, self.real_test.labels, device=self.device
            )
            log(INFO, "federated DP-SGD model: accuracy on the central real test split %.4f", self.accuracy_real_test)
        self.model_arrays = ArrayRecord({name: Array(value) for name, value in state_dict_to_numpy(model).items()})
        return self.model_arrays
