"""The typed records of a vote round and a federated evaluation, both ways, and the checks a
received reply passes before it is used. Plain Python (no flwr)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np

from coautogen_fl.protocol.fields import (
    ACCURACY,
    CANDIDATES,
    CHANNELS,
    CLASS_ERRORS,
    CONFIG,
    CORRECT,
    EMBEDDINGS,
    EPSILON_BUDGET,
    EPSILON_SPENT,
    EVALUATION_NOISE,
    IMAGE_SIZE,
    LABELS,
    METRICS,
    MODEL,
    NOISE_MULTIPLIER,
    NUM_CLASSES,
    NUM_EXAMPLES,
    PARTITION_ID,
    PRIVACY_MODE,
    PRIVACY_UNIT,
    RATER,
    ROUND,
    RUN_KEY,
    SECAGG_SUMMANDS,
    SECAGG_VOTE_CAP,
    SITE,
    SITE_LABEL,
    VOTES,
    WEIGHTS,
    K,
    ReplyError,
)

Scalar = Union[int, float, str, bool]


@dataclass
class WireParts:
    """A message's content as plain values, per Flower record kind and record name."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    configs: dict[str, dict[str, Scalar]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Union[int, float]]] = field(default_factory=dict)


def _get(record: Mapping[str, Any] | None, key: str, kind: type, what: str) -> Any:
    if record is None or key not in record:
        raise ReplyError(f"{what} lacks '{key}'")
    value = record[key]
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ReplyError(f"{what}: '{key}' is {value!r}, expected {kind.__name__}") from None


def _label(parts: WireParts) -> str:
    """A reply's site label (optional on the wire: an older site sends none)."""
    return str(parts.configs.get(SITE, {}).get(SITE_LABEL, ""))


def _finite_non_negative(value: float, name: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise ReplyError(f"{name} is {value}, expected a finite non-negative number")
    return value


def fingerprint(parts: WireParts) -> str:
    """SHA-256 over a request's parts (config values, array dtypes, shapes and bytes), in key order."""
    digest = hashlib.sha256()
    for name in sorted(parts.configs):
        for key, value in sorted(parts.configs[name].items()):
            digest.update(f"{name}/{key}={value!r}\x00".encode())
    for name in sorted(parts.arrays):
        for key, array in sorted(parts.arrays[name].items()):
            array = np.ascontiguousarray(array)
            digest.update(f"{name}/{key}:{array.dtype.str}{array.shape}\x00".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelProbe:
    """A model a vote request carries (``-f Active``): the site releases its errors per class on
    its voters together with the votes, one Gaussian release."""

    model: str
    num_classes: int
    channels: int
    image_size: int
    weights: dict[str, np.ndarray]

    def config(self) -> dict[str, Scalar]:
        return {
            MODEL: self.model,
            NUM_CLASSES: int(self.num_classes),
            CHANNELS: int(self.channels),
            IMAGE_SIZE: int(self.image_size),
        }

    @classmethod
    def from_parts(cls, parts: WireParts, what: str) -> "ModelProbe":
        config = parts.configs.get(CONFIG)
        num_classes = _get(config, NUM_CLASSES, int, what)
        if num_classes < 1:
            raise ReplyError(f"{what}: '{NUM_CLASSES}' is {num_classes}, expected >= 1")
        return cls(
            _get(config, MODEL, str, what),
            num_classes,
            _get(config, CHANNELS, int, what),
            _get(config, IMAGE_SIZE, int, what),
            dict(parts.arrays[WEIGHTS]),
        )


@dataclass(frozen=True)
class VoteRequest:
    """Server -> site (TRAIN): the pool's embeddings and how to vote on them."""

    round: int
    rater: str
    k: int
    noise_multiplier: float
    privacy_mode: str
    privacy_unit: str
    embeddings: np.ndarray  # float16 (N, D)
    labels: np.ndarray  # int64 (N,)
    run_key: str = ""  # the run's identity in the sites' ledgers (kept by a resumed run); "" = the Flower run id
    secagg_summands: int = 0  # privacy_mode secagg: the fewest sites any revealed sum holds
    secagg_vote_cap: int = 0  # privacy_mode secagg: clean votes per candidate are clipped to this
    probe: Optional["ModelProbe"] = None  # -f Active: the model whose per-class errors the site releases with its votes

    def to_parts(self) -> WireParts:
        config: dict[str, Scalar] = {
            RUN_KEY: self.run_key,
            ROUND: int(self.round),
            RATER: self.rater,
            K: int(self.k),
            NOISE_MULTIPLIER: float(self.noise_multiplier),
            PRIVACY_MODE: self.privacy_mode,
            PRIVACY_UNIT: self.privacy_unit,
        }
        if self.privacy_mode == "secagg":
            config.update({SECAGG_SUMMANDS: int(self.secagg_summands), SECAGG_VOTE_CAP: int(self.secagg_vote_cap)})
        arrays = {EMBEDDINGS: np.asarray(self.embeddings), LABELS: np.asarray(self.labels, dtype=np.int64)}
        parts = WireParts(arrays={CANDIDATES: arrays}, configs={CONFIG: config})
        if self.probe is not None:
            config.update(self.probe.config())
            parts.arrays[WEIGHTS] = dict(self.probe.weights)
        return parts

    def to_legacy(self) -> tuple[list[np.ndarray], dict[str, Scalar]]:
        """The request as a legacy FitIns (arrays, config): how SecAgg+ carries it."""
        parts = self.to_parts()
        return [parts.arrays[CANDIDATES][EMBEDDINGS], parts.arrays[CANDIDATES][LABELS]], parts.configs[CONFIG]

    @classmethod
    def from_legacy(cls, arrays: list[np.ndarray], config: Mapping[str, Scalar]) -> "VoteRequest":
        """The request a SecAgg+ round carried as a legacy FitIns."""
        if len(arrays) != 2:
            raise ReplyError(f"secure vote request carries {len(arrays)} arrays, expected embeddings and labels")
        return cls.from_parts(
            WireParts(arrays={CANDIDATES: {EMBEDDINGS: arrays[0], LABELS: arrays[1]}}, configs={CONFIG: dict(config)})
        )

    @classmethod
    def from_parts(cls, parts: WireParts) -> "VoteRequest":
        what = "vote request"
        config, arrays = parts.configs.get(CONFIG), parts.arrays.get(CANDIDATES)
        embeddings, labels = _get(arrays, EMBEDDINGS, np.asarray, what), _get(arrays, LABELS, np.asarray, what)
        if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
            raise ReplyError(f"{what}: embeddings {embeddings.shape} and labels {labels.shape} do not match")
        return cls(
            round=_get(config, ROUND, int, what),
            rater=_get(config, RATER, str, what),
            k=_get(config, K, int, what),
            noise_multiplier=_get(config, NOISE_MULTIPLIER, float, what),
            privacy_mode=_get(config, PRIVACY_MODE, str, what),
            privacy_unit=_get(config, PRIVACY_UNIT, str, what),
            embeddings=embeddings,
            labels=labels.astype(np.int64),
            run_key=str(config.get(RUN_KEY, "")),  # config is there: _get above checked it
            secagg_summands=int(config.get(SECAGG_SUMMANDS, 0)),
            secagg_vote_cap=int(config.get(SECAGG_VOTE_CAP, 0)),
            probe=ModelProbe.from_parts(parts, what) if WEIGHTS in parts.arrays else None,
        )

    def fingerprint(self) -> str:
        """A hash of everything the site's release depends on besides its data: a site replays a
        stored release only for the very same request."""
        return fingerprint(self.to_parts())


def _bookkeeping(reply: Any) -> dict[str, Scalar]:
    """The public bookkeeping a vote or training reply carries: spend, budget, partition, noise."""
    return {
        EPSILON_SPENT: float(reply.epsilon_spent),
        EPSILON_BUDGET: float(reply.epsilon_budget),
        PARTITION_ID: int(reply.partition_id),
        NOISE_MULTIPLIER: float(reply.noise_multiplier),
    }


def _bookkeeping_fields(parts: WireParts, what: str) -> dict[str, Any]:
    """:func:`_bookkeeping` and the site's label read back, checked."""
    metrics = parts.metrics.get(METRICS)
    return {
        "epsilon_spent": _finite_non_negative(_get(metrics, EPSILON_SPENT, float, what), EPSILON_SPENT),
        "epsilon_budget": _finite_non_negative(_get(metrics, EPSILON_BUDGET, float, what), EPSILON_BUDGET),
        "partition_id": _get(metrics, PARTITION_ID, int, what),
        "noise_multiplier": _get(metrics, NOISE_MULTIPLIER, float, what),
        "site_label": _label(parts),
    }


@dataclass(frozen=True)
class VoteReply:
    """Site -> server (TRAIN reply): the charged votes and public bookkeeping only."""

    votes: np.ndarray
    epsilon_spent: float
    epsilon_budget: float
    partition_id: int
    noise_multiplier: float
    site_label: str = ""
    class_errors: Optional[np.ndarray] = None  # -f Active: the probe's errors per class, noised with the votes

    def to_parts(self) -> WireParts:
        metrics = _bookkeeping(self)
        arrays = {VOTES: {VOTES: np.asarray(self.votes, dtype=np.float64)}}
        if self.class_errors is not None:
            arrays[VOTES][CLASS_ERRORS] = np.asarray(self.class_errors, dtype=np.float64)
        return WireParts(arrays=arrays, configs={SITE: {SITE_LABEL: self.site_label}}, metrics={METRICS: metrics})

    def to_legacy(self) -> tuple[list[np.ndarray], dict[str, Scalar]]:
        """A secure vote reply as a legacy FitRes (arrays, metrics): the integer votes, which
        SecAgg+ masks before they leave, and the public bookkeeping, which travels in the clear."""
        return [np.asarray(self.votes, dtype=np.int64)], {**_bookkeeping(self), SITE_LABEL: self.site_label}

    @classmethod
    def from_parts(cls, parts: WireParts) -> "VoteReply":
        what = "vote reply"
        votes = np.asarray(_get(parts.arrays.get(VOTES), VOTES, np.asarray, what), dtype=np.float64)
        errors = parts.arrays[VOTES].get(CLASS_ERRORS)
        return cls(
            votes=votes,
            **_bookkeeping_fields(parts, what),
            class_errors=None if errors is None else np.asarray(errors, dtype=np.float64),
        )


def legacy_bookkeeping(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The public bookkeeping of a secure (vote or DP-SGD) reply's legacy metrics, checked."""
    parts = WireParts(configs={SITE: {SITE_LABEL: str(metrics.get(SITE_LABEL, ""))}}, metrics={METRICS: dict(metrics)})
    return _bookkeeping_fields(parts, "secure reply")


def _model_config(request: Any) -> dict[str, Scalar]:
    """The config entries every request carrying a model shares: run key, round, model spec."""
    return {
        RUN_KEY: request.run_key,
        ROUND: int(request.round),
        MODEL: request.model,
        NUM_CLASSES: int(request.num_classes),
        CHANNELS: int(request.channels),
        IMAGE_SIZE: int(request.image_size),
    }


def _model_fields(parts: WireParts, what: str) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """(the shared fields of a request carrying a model, its config) read back; raises
    ReplyError when the weights or a field are missing."""
    config = parts.configs.get(CONFIG)
    if WEIGHTS not in parts.arrays:
        raise ReplyError(f"{what} lacks the '{WEIGHTS}' record")
    fields = {
        "round": _get(config, ROUND, int, what),
        "model": _get(config, MODEL, str, what),
        "num_classes": _get(config, NUM_CLASSES, int, what),
        "channels": _get(config, CHANNELS, int, what),
        "image_size": _get(config, IMAGE_SIZE, int, what),
        "weights": dict(parts.arrays[WEIGHTS]),
        "run_key": str(config.get(RUN_KEY, "")),  # config is there: _get above checked it
    }
    return fields, config  # type: ignore[return-value]


@dataclass(frozen=True)
class EvaluationRequest:
    """Server -> site (EVALUATE): the downstream model and how to release its accuracy.

    ``noise_multiplier`` 0 asks for a clear release, which a site sends only when its own node
    config allows it (``allow-clear-evaluation``).
    """

    round: int
    model: str
    num_classes: int
    channels: int
    image_size: int
    noise_multiplier: float
    weights: dict[str, np.ndarray]
    run_key: str = ""

    def to_parts(self) -> WireParts:
        config = {**_model_config(self), EVALUATION_NOISE: float(self.noise_multiplier)}
        return WireParts(arrays={WEIGHTS: dict(self.weights)}, configs={CONFIG: config})

    @classmethod
    def from_parts(cls, parts: WireParts) -> "EvaluationRequest":
        what = "evaluation request"
        fields, config = _model_fields(parts, what)
        return cls(noise_multiplier=_get(config, EVALUATION_NOISE, float, what), **fields)

    def fingerprint(self) -> str:
        """A hash of the whole request (model weights included)."""
        return fingerprint(self.to_parts())


@dataclass(frozen=True)
class EvaluationReply:
    """Site -> server (EVALUATE reply): (correct, count) noised and charged, or, with the
    site's consent, in the clear with the accuracy."""

    correct: float
    count: float
    epsilon_spent: float
    epsilon_budget: float
    partition_id: int
    accuracy: Optional[float] = None  # only in a clear release
    site_label: str = ""

    def to_parts(self) -> WireParts:
        metrics: dict[str, Union[int, float]] = {
            CORRECT: float(self.correct),
            NUM_EXAMPLES: float(self.count),
            EPSILON_SPENT: float(self.epsilon_spent),
            EPSILON_BUDGET: float(self.epsilon_budget),
            PARTITION_ID: int(self.partition_id),
        }
        if self.accuracy is not None:
            metrics[ACCURACY] = float(self.accuracy)
        return WireParts(configs={SITE: {SITE_LABEL: self.site_label}}, metrics={METRICS: metrics})

    @classmethod
    def from_parts(cls, parts: WireParts) -> "EvaluationReply":
        what, metrics = "evaluation reply", parts.metrics.get(METRICS)
        accuracy = _get(metrics, ACCURACY, float, what) if metrics is not None and ACCURACY in metrics else None
        return cls(
            correct=_get(metrics, CORRECT, float, what),
            count=_get(metrics, NUM_EXAMPLES, float, what),
            epsilon_spent=_finite_non_negative(_get(metrics, EPSILON_SPENT, float, what), EPSILON_SPENT),
            epsilon_budget=_finite_non_negative(_get(metrics, EPSILON_BUDGET, float, what), EPSILON_BUDGET),
            partition_id=_get(metrics, PARTITION_ID, int, what),
            accuracy=accuracy,
            site_label=_label(parts),
        )


def validate_votes(
    votes: np.ndarray, num_candidates: int, noise_std: float, max_clean_total: float, what: str = "votes"
) -> None:
    """Check a vote vector before it is summed: shape, finite values, plausible size.

    Clean votes of one site are non-negative and sum to at most ``max_clean_total`` (a public
    bound: the most private images a site may hold times sqrt(k)); sites never send their
    size. Gaussian noise of std ``noise_std`` adds about ``0.8 * N * noise_std`` to the L1 norm
    (std ``0.6 * sqrt(N) * noise_std``), so a reply beyond ``N * noise_std + 10 * sqrt(N) *
    noise_std`` of slack is not an honest one. ``what`` names the vector in the error (``-f Active``'s
    class errors are checked the same way: non-negative clean counts, at most one per private image).
    """
    if votes.shape != (num_candidates,):
        raise ReplyError(f"{what} have shape {votes.shape}, expected ({num_candidates},)")
    if not np.all(np.isfinite(votes)):
        raise ReplyError(f"{what} contain NaN or infinite values")
    slack = noise_std * (num_candidates + 10.0 * np.sqrt(num_candidates))
    total = float(np.abs(votes).sum())
    if total > max_clean_total + slack + 1e-6:
        raise ReplyError(
            f"{what} sum to {total:.1f} in absolute value, more than any site may cast "
            f"({max_clean_total:.0f} clean votes at most, noise std {noise_std:.3g})"
        )
