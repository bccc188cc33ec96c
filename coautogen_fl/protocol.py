"""The wire between the strategy and the sites: every message both ways as a typed record, and
what each field a site sends *is* in privacy terms. Plain Python (no flwr).

Everything a site sends is declared here (:data:`SITE_REPLY_FIELDS`), and each field is one of
:class:`Release`: a release the site's ledger charged before it left, a public value that does
not depend on the private data, or a value the site's own node config consented to release in
the clear. ``tests/test_wire.py`` records every reply of whole simulated runs through a client
mod and checks each field against this declaration.

Each record converts to and from :class:`WireParts` (plain dicts of arrays, config values and
metrics per Flower record name); ``clients/wire.py`` maps those onto Flower's RecordDict. No
other module spells a key.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Optional, Union

import numpy as np

Scalar = Union[int, float, str, bool]

# Record names and keys: spelled here only.
CANDIDATES, EMBEDDINGS, LABELS = "candidates", "embeddings", "labels"
CONFIG, VOTES, METRICS, WEIGHTS = "config", "votes", "metrics", "arrays"
#: -tt real/mix with privacy.mode=central: a site's clipped per-example gradient sum of one Poisson batch.
GRADIENTS = "gradients"
#: -f Active: the per-class errors of the server's model on the site's voters, released with the votes.
CLASS_ERRORS = "class-errors"
ROUND, RATER, K = "round", "rater", "k"
NOISE_MULTIPLIER, PRIVACY_MODE, PRIVACY_UNIT = "noise-multiplier", "privacy-mode", "privacy-unit"
MODEL, NUM_CLASSES, CHANNELS, IMAGE_SIZE = "model", "num-classes", "channels", "image-size"
EVALUATION_NOISE = "evaluation-noise-multiplier"
RUN_KEY = "run-key"
SITE, SITE_LABEL = "site", "site-label"
EPSILON_SPENT, EPSILON_BUDGET, PARTITION_ID = "epsilon-spent", "epsilon-budget", "partition-id"
CORRECT, NUM_EXAMPLES, ACCURACY = "correct", "num-examples", "accuracy"
SAMPLE_RATE, LOCAL_STEPS, MAX_GRAD_NORM = "sample-rate", "local-steps", "max-grad-norm"
LEARNING_RATE, OPTIMIZER = "learning-rate", "optimizer"
#: The Flower message type of a DP-SGD round (``@app.train("dpsgd")`` at the site).
TRAIN_DPSGD = "train.dpsgd"
#: SITE_REPLY_FIELDS kind of a central-mode DP-SGD reply (same message type, gradients instead of weights).
TRAIN_DPSGD_CENTRAL = "train.dpsgd-central"
#: ``privacy.mode=secagg``: the fewest sites any revealed sum holds, and the public clean-vote cap.
SECAGG_SUMMANDS, SECAGG_VOTE_CAP = "secagg-summands", "secagg-vote-cap"
#: ``privacy.mode=secagg`` DP-SGD: the public per-coordinate cap of a gradient sum (units of the
#: clipping norm), the names of the model's parameters in a legacy FitIns (comma-separated, in
#: order), and the legacy config entry that says a SecAgg+ round carries a training request.
SECAGG_GRADIENT_CAP, WEIGHT_NAMES, REQUEST_KIND = "secagg-gradient-cap", "weight-names", "request-kind"
#: Flower's SecAgg+ record (``flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS``;
#: tests/test_secagg.py checks the spelling) and the legacy fit records it wraps.
SECAGG_CONFIGS = "secaggplus_configs"
FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"
FITRES_ARRAYS, FITRES_METRICS = "fitres.parameters", "fitres.metrics"
FITRES_NUM_EXAMPLES, FITRES_STATUS = "fitres.num_examples", "fitres.status"
#: A declared field whose key is any key of its record (the model's parameter names).
ANY_KEY = "*"


class Release(str, Enum):
    """What a field a site sends is, in privacy terms."""

    CHARGED = "charged"
    """Charged to the site's ledger before it left: noised by the site (local mode) or sent
    clean only to a server the site's own node config trusts, which noises the sum (central)."""
    PUBLIC = "public"
    """Independent of the private data: node config, an echo of the request, or the ledger's
    spend (a function of the noise multipliers charged so far, nothing else)."""
    CONSENTED = "consented"
    """Released without noise only because the site's own node config allows it
    (``allow-clear-evaluation``); outside epsilon."""


@dataclass(frozen=True)
class WireField:
    """One value a site sends: the Flower record holding it, its key, and what it is."""

    record: str
    key: str
    release: Release
    meaning: str


#: What every reply of a site carries besides its release: public bookkeeping.
_SITE_BOOKKEEPING = (
    WireField(METRICS, EPSILON_SPENT, Release.PUBLIC, "the site's total epsilon after this release"),
    WireField(METRICS, EPSILON_BUDGET, Release.PUBLIC, "the site's own budget (its node config)"),
    WireField(METRICS, PARTITION_ID, Release.PUBLIC, "the site's partition id (its node config)"),
    WireField(SITE, SITE_LABEL, Release.PUBLIC, "the site's own name (node config site-name; empty if unset)"),
)


#: A SecAgg+ stage's fields (Flower's ``Key`` values): data-independent protocol values.
def _secagg_public(*keys_meanings: tuple[str, str]) -> tuple[WireField, ...]:
    return tuple(WireField(SECAGG_CONFIGS, key, Release.PUBLIC, meaning) for key, meaning in keys_meanings)


#: Every field a site may send, by message type. Nothing else leaves a site. A SecAgg+ vote
#: round (``privacy.mode=secagg``) is four TRAIN replies, one per stage.

SITE_REPLY_FIELDS: dict[str, tuple[WireField, ...]] = {
    "train": (
        WireField(VOTES, VOTES, Release.CHARGED, "vote per candidate (float64 on the 1/16 grid)"),
        WireField(METRICS, NOISE_MULTIPLIER, Release.PUBLIC, "echo of the requested noise multiplier"),
        *_SITE_BOOKKEEPING,
    ),
    "train-active": (  # -f Active, once the request carries a model: one release of both vectors
        WireField(VOTES, VOTES, Release.CHARGED, "vote per candidate (float64 on the 1/16 grid)"),
        WireField(
            VOTES,
            CLASS_ERRORS,
            Release.CHARGED,
            "the request's model's misclassified voters per class, noised with the votes (one charge)",
        ),
        WireField(METRICS, NOISE_MULTIPLIER, Release.PUBLIC, "echo of the requested noise multiplier"),
        *_SITE_BOOKKEEPING,
    ),
    TRAIN_DPSGD: (
        WireField(
            WEIGHTS, ANY_KEY, Release.CHARGED, "the model after the site's DP-SGD steps, one array per parameter"
        ),
        WireField(METRICS, NOISE_MULTIPLIER, Release.PUBLIC, "echo of the requested noise multiplier"),
        *_SITE_BOOKKEEPING,
    ),
    TRAIN_DPSGD_CENTRAL: (  # privacy.mode=central: one DP-SGD step, the server noises the sum
        WireField(
            GRADIENTS,
            ANY_KEY,
            Release.CHARGED,
            "the clipped per-example gradient sum of one Poisson batch, clean to a server the site's node config "
            "trusts, which adds the noise to the sum of all sites",
        ),
        WireField(METRICS, NOISE_MULTIPLIER, Release.PUBLIC, "echo of the requested noise multiplier"),
        *_SITE_BOOKKEEPING,
    ),
    "evaluate": (
        WireField(METRICS, CORRECT, Release.CHARGED, "correctly classified site-test images, noised"),
        WireField(METRICS, NUM_EXAMPLES, Release.CHARGED, "site-test images, noised"),
        *_SITE_BOOKKEEPING,
    ),
    "secagg-setup": _secagg_public(
        ("pk1", "a fresh public key for pairwise masks (random, this round only)"),
        ("pk2", "a fresh public key for encrypting shares (random, this round only)"),
    ),
    "secagg-share-keys": _secagg_public(
        ("dsts", "the node ids of its neighbours (from the server's setup)"),
        ("ctxts", "Shamir shares of its own random mask seed and key, each encrypted to one neighbour"),
    ),
    "secagg-collect": (
        WireField(
            SECAGG_CONFIGS,
            "masked_params",
            Release.CHARGED,
            "integer votes (or, in a secure DP-SGD round, the integer clipped gradient sum) plus the site's "
            "discrete-Gaussian noise share, under masks (uniform mod 2^32 alone)",
        ),
        WireField(
            FITRES_NUM_EXAMPLES, "num_examples", Release.PUBLIC, "the constant 1: SecAgg+'s weight (sizes never leave)"
        ),
        WireField(FITRES_STATUS, "code", Release.PUBLIC, "the constant OK code of a legacy fit reply"),
        WireField(FITRES_STATUS, "message", Release.PUBLIC, "the constant message of a legacy fit reply"),
        *(
            WireField(FITRES_METRICS, f.key, f.release, f.meaning)
            for f in (
                WireField(METRICS, NOISE_MULTIPLIER, Release.PUBLIC, "echo of the requested noise multiplier"),
                *_SITE_BOOKKEEPING,
            )
        ),
    ),
    "secagg-unmask": _secagg_public(
        ("nids", "the node ids whose shares follow (from the server's lists)"),
        (
            "shares",
            "shares of neighbours' mask seeds (survivors) or keys (dropped): removes masks, reveals only the sum",
        ),
    ),
    "evaluate-clear": (
        WireField(METRICS, CORRECT, Release.CONSENTED, "correctly classified site-test images"),
        WireField(METRICS, NUM_EXAMPLES, Release.CONSENTED, "site-test images"),
        WireField(METRICS, ACCURACY, Release.CONSENTED, "accuracy on the site-test images"),
        *_SITE_BOOKKEEPING,
    ),
}


def vote_reply_kind(arrays: Mapping[str, Mapping[str, Any]]) -> str:
    """The SITE_REPLY_FIELDS kind of a (non-SecAgg+) vote reply, from its array records."""
    return "train-active" if CLASS_ERRORS in arrays.get(VOTES, {}) else "train"


def declared_field(kind: str, record: str, key: str) -> Optional[WireField]:
    """The declaration of ``record/key`` in a ``kind`` reply (an ``ANY_KEY`` field covers its
    whole record), or None when the site must not send it."""
    for f in SITE_REPLY_FIELDS[kind]:
        if f.record == record and f.key in (key, ANY_KEY):
            return f
    return None


# Error replies carry one of these codes and its generic line, nothing else: the details
# (paths, sizes, tracebacks) stay in the site's own log.
ERROR_BUDGET_EXCEEDED = 1001
ERROR_BAD_REQUEST = 1002
ERROR_NO_DATA = 1003
ERROR_SITE_TERMS = 1004
ERROR_NOT_ALLOWED = 1005
ERROR_DATA_PATH = 1006
ERROR_REASONS: dict[int, str] = {
    ERROR_BUDGET_EXCEEDED: "refused: this release would exceed the site's privacy budget (or its ledger is unreadable)",
    ERROR_BAD_REQUEST: "refused: the request is malformed or asks for something the site does not allow",
    ERROR_NO_DATA: "failed: the site cannot load its private data; its operator has the details in the site log",
    ERROR_SITE_TERMS: "refused: the site's node config does not set its privacy terms (site-epsilon); see its log",
    ERROR_NOT_ALLOWED: (
        "refused: the site's terms do not allow this release "
        "(clean votes to an untrusted server, or a clear evaluation)"
    ),
    ERROR_DATA_PATH: (
        "failed: the site's data folder (node config data-path) is not set, not found "
        "or not an ImageFolder with images; see its log"
    ),
}


#: Codes by which a site declines on its own terms (as opposed to failing or rejecting a bad request).
REFUSAL_CODES = frozenset({ERROR_BUDGET_EXCEEDED, ERROR_SITE_TERMS, ERROR_NOT_ALLOWED})


class SiteRefusal(PermissionError):
    """A site declines a well-formed request because its terms do not allow it."""


class ReplyError(ValueError):
    """A message is malformed; the receiver drops it and logs this reason."""


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
