"""The typed records of a DP-SGD round (``-tt real`` / ``-tt mix``), both ways, and the check a
site's trained weights pass before they are averaged. Plain Python (no flwr)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from coautogen_fl.protocol.fields import (
    CONFIG,
    GRADIENTS,
    LEARNING_RATE,
    LOCAL_STEPS,
    MAX_GRAD_NORM,
    METRICS,
    NOISE_MULTIPLIER,
    OPTIMIZER,
    PRIVACY_MODE,
    REQUEST_KIND,
    SAMPLE_RATE,
    SECAGG_GRADIENT_CAP,
    SECAGG_SUMMANDS,
    SITE,
    SITE_LABEL,
    TRAIN_DPSGD,
    WEIGHT_NAMES,
    WEIGHTS,
    ReplyError,
)
from coautogen_fl.protocol.records import (
    Scalar,
    WireParts,
    _bookkeeping,
    _bookkeeping_fields,
    _get,
    _model_config,
    _model_fields,
    fingerprint,
)


@dataclass(frozen=True)
class TrainRequest:
    """Server -> site (``train.dpsgd``): the global model and the DP-SGD steps to run on it.

    The sample rate is public and the same for every site: the noise is calibrated to it, and a
    rate derived from a site's size would reveal that size.
    """

    round: int
    model: str
    num_classes: int
    channels: int
    image_size: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    lr: float
    optimizer: str
    weights: dict[str, np.ndarray]
    run_key: str = ""
    #: local: DP-SGD steps at the site; central: one clipped gradient sum, noised by the server;
    #: secagg: one integer clipped gradient sum plus the site's noise share, through SecAgg+.
    privacy_mode: str = "local"
    secagg_summands: int = 0  # privacy_mode secagg: the fewest sites any revealed sum holds
    secagg_gradient_cap: float = 0.0  # privacy_mode secagg: per-coordinate cap of a sum, in units of the clip

    def to_parts(self) -> WireParts:
        config: dict[str, Scalar] = {
            **_model_config(self),
            PRIVACY_MODE: self.privacy_mode,
            NOISE_MULTIPLIER: float(self.noise_multiplier),
            SAMPLE_RATE: float(self.sample_rate),
            LOCAL_STEPS: int(self.steps),
            MAX_GRAD_NORM: float(self.max_grad_norm),
            LEARNING_RATE: float(self.lr),
            OPTIMIZER: self.optimizer,
        }
        if self.privacy_mode == "secagg":
            config.update(
                {SECAGG_SUMMANDS: int(self.secagg_summands), SECAGG_GRADIENT_CAP: float(self.secagg_gradient_cap)}
            )
        return WireParts(arrays={WEIGHTS: dict(self.weights)}, configs={CONFIG: config})

    def to_legacy(self) -> tuple[list[np.ndarray], dict[str, Scalar]]:
        """The request as a legacy FitIns (arrays in name order, config naming them): how SecAgg+ carries it."""
        names = sorted(self.weights)
        if any("," in name for name in names):
            raise ValueError(f"parameter names {names} cannot travel comma-separated")
        config = {**self.to_parts().configs[CONFIG], WEIGHT_NAMES: ",".join(names), REQUEST_KIND: TRAIN_DPSGD}
        return [np.asarray(self.weights[name]) for name in names], config

    @classmethod
    def from_legacy(cls, arrays: list[np.ndarray], config: Mapping[str, Scalar]) -> "TrainRequest":
        """The request a SecAgg+ round carried as a legacy FitIns."""
        names = str(config.get(WEIGHT_NAMES, "")).split(",")
        if len(names) != len(arrays) or not all(names):
            raise ReplyError(f"secure training request names {len(names)} parameters for {len(arrays)} arrays")
        return cls.from_parts(WireParts(arrays={WEIGHTS: dict(zip(names, arrays))}, configs={CONFIG: dict(config)}))

    @classmethod
    def from_parts(cls, parts: WireParts) -> "TrainRequest":
        what = "training request"
        fields, config = _model_fields(parts, what)
        return cls(
            noise_multiplier=_get(config, NOISE_MULTIPLIER, float, what),
            sample_rate=_get(config, SAMPLE_RATE, float, what),
            steps=_get(config, LOCAL_STEPS, int, what),
            max_grad_norm=_get(config, MAX_GRAD_NORM, float, what),
            lr=_get(config, LEARNING_RATE, float, what),
            optimizer=_get(config, OPTIMIZER, str, what),
            privacy_mode=str(config.get(PRIVACY_MODE, "local")),
            secagg_summands=int(config.get(SECAGG_SUMMANDS, 0)),
            secagg_gradient_cap=float(config.get(SECAGG_GRADIENT_CAP, 0.0)),
            **fields,
        )

    def fingerprint(self) -> str:
        """A hash of the whole request (global weights included): a site replays a stored
        release only for the very same request."""
        return fingerprint(self.to_parts())


@dataclass(frozen=True)
class TrainReply:
    """Site -> server (``train.dpsgd`` reply): the DP-SGD-trained weights, charged, and public
    bookkeeping. No example count: the server weighs every site equally."""

    weights: dict[str, np.ndarray]
    epsilon_spent: float
    epsilon_budget: float
    partition_id: int
    noise_multiplier: float
    site_label: str = ""
    gradients: bool = False  # central mode: ``weights`` holds the clipped gradient sum per parameter

    def to_legacy(self, integers: np.ndarray) -> tuple[list[np.ndarray], dict[str, Scalar]]:
        """A secure DP-SGD reply as a legacy FitRes (arrays, metrics): ``integers``, the noised
        integer gradient sum SecAgg+ masks before it leaves, and the public bookkeeping in the clear."""
        return [np.asarray(integers, dtype=np.int64)], {**_bookkeeping(self), SITE_LABEL: self.site_label}

    def to_parts(self) -> WireParts:
        metrics = _bookkeeping(self)
        arrays = {GRADIENTS if self.gradients else WEIGHTS: {k: np.asarray(v) for k, v in self.weights.items()}}
        return WireParts(arrays=arrays, configs={SITE: {SITE_LABEL: self.site_label}}, metrics={METRICS: metrics})

    @classmethod
    def from_parts(cls, parts: WireParts) -> "TrainReply":
        what = "training reply"
        record = next((r for r in (WEIGHTS, GRADIENTS) if r in parts.arrays), None)
        if record is None:
            raise ReplyError(f"{what} lacks the '{WEIGHTS}' (or '{GRADIENTS}') record")
        return cls(
            weights=dict(parts.arrays[record]),
            **_bookkeeping_fields(parts, what),
            gradients=record == GRADIENTS,
        )


def validate_weights(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Check a site's trained weights before they are averaged: the very keys and shapes of the
    model the server sent, finite float values."""
    if set(weights) != set(reference):
        raise ReplyError(f"weights have keys {sorted(set(weights) ^ set(reference))} the model does not (or lack them)")
    for key, ref in reference.items():
        array = np.asarray(weights[key])
        if array.shape != np.shape(ref) or array.dtype.kind != "f":
            raise ReplyError(f"weights '{key}' are {array.dtype}{array.shape}, expected float{np.shape(ref)}")
        if not np.all(np.isfinite(array)):
            raise ReplyError(f"weights '{key}' contain NaN or infinite values")
