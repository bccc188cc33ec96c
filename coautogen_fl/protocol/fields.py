"""The wire's vocabulary and its privacy declaration: every record name and key (spelled here
only), what each field a site sends is (:data:`SITE_REPLY_FIELDS`), and the error codes a site
may answer with. Plain Python (no flwr)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Optional

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
