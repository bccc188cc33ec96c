"""Empirical privacy audit of a site's vote release (DESIGN.md, "Privacy model").

A site's release is run many times on two neighbouring inputs and the two output samples are
checked against the claimed mechanism:

1. noise calibration: per coordinate, the sample std of ``output - clean votes`` lies in its
   chi-square confidence interval around the claimed std (and the mean in its normal CI around
   the clean votes);
2. empirical epsilon: outputs are projected on the direction of the difference of the clean
   vectors; for a grid of thresholds the false-positive / false-negative rates of the test
   "this output came from the other dataset" are bounded with Clopper-Pearson intervals and give
   the standard audit lower bound ``eps_lb = max_t log((1 - delta - FNR_upper) / FPR_upper)``
   (valid with probability >= 1 - alpha). It must stay below the claimed epsilon.

Both audits are also run on a deliberately broken mechanism that adds half the claimed noise:
each must then FAIL (parametrised ``expected_pass``), so the suite shows the audit has power.

Adjacency: the image unit is add/remove of one private image (per-sample sensitivity 1); the site
unit is add/remove of one whole site whose vote vector is L2-normalised to norm <= 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import beta, chi2, norm

from coautogen_fl.privacy import GaussianMechanism, PrivacyLedger, epsilon_for_noise, noise_multiplier_for_epsilon
from coautogen_fl.rater import normalise_site_vector, vote_histogram

# ---- the claim being audited: one release at (EPS_CLAIM, DELTA) -----------------------------
EPS_CLAIM, DELTA = 2.0, 1e-5
SIGMA = noise_multiplier_for_epsilon(EPS_CLAIM, DELTA, 1)  # ~1.99 for sensitivity 1
SENSITIVITY = 1.0
CLAIMED_STD = SIGMA * SENSITIVITY

N_RELEASES = 200_000  # per dataset; 20k only reaches eps_lb ~2.05 for halved noise (no margin)
CALIBRATION_ALPHA = 1e-6  # overall, Bonferroni over datasets, coordinates, std and mean
EPSILON_ALPHA = 0.05  # eps_lb holds with prob >= 95 %, Bonferroni over thresholds and directions
N_THRESHOLDS = 101

# ---- a small, fixed site --------------------------------------------------------------------
NUM_CANDIDATES, NUM_CLASSES, DIM, NUM_PRIVATE = 12, 3, 8, 30
_data_rng = np.random.default_rng(20240917)
# float32 like Site.vote, which casts the candidate embeddings to float32 before scoring.
CANDIDATES = _data_rng.normal(size=(NUM_CANDIDATES, DIM)).astype(np.float32)
CANDIDATE_LABELS = np.arange(NUM_CANDIDATES) % NUM_CLASSES
PRIVATE = _data_rng.normal(size=(NUM_PRIVATE, DIM)).astype(np.float32)
PRIVATE_LABELS = _data_rng.integers(0, NUM_CLASSES, NUM_PRIVATE)
EXTRA = _data_rng.normal(size=(1, DIM)).astype(np.float32)
# D' = D plus one image.
PRIVATE_PLUS = np.concatenate([PRIVATE, EXTRA])
PRIVATE_PLUS_LABELS = np.concatenate([PRIVATE_LABELS, [1]])
# Two more sites for the per-site unit (central sum).
OTHER_SITES = [
    (_data_rng.normal(size=(NUM_PRIVATE, DIM)).astype(np.float32), _data_rng.integers(0, NUM_CLASSES, NUM_PRIVATE))
    for _ in range(2)
]
EMPTY = (np.zeros((0, DIM), dtype=np.float32), np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class HalvedNoiseMechanism(GaussianMechanism):
    """Deliberately broken: claims ``noise_std`` but adds noise of std ``noise_std / 2``."""

    def apply(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return GaussianMechanism(self.noise_multiplier / 2, self.sensitivity).apply(values, rng)


MECHANISMS = {"gaussian": GaussianMechanism, "halved_noise": HalvedNoiseMechanism}
AUDIT_CASES = [pytest.param("gaussian", True, id="real-mechanism-passes"),
               pytest.param("halved_noise", False, id="halved-noise-detected")]


# ---- the release under audit (Site.vote's path, vectorised over N releases) -----------------
def clean_votes(private_emb: np.ndarray, private_labels: np.ndarray, unit: str = "image") -> np.ndarray:
    """Site.vote's clean part: the PE vote histogram (k=1), L2-normalised for the site unit."""
    votes = vote_histogram(private_emb, private_labels, CANDIDATES, CANDIDATE_LABELS, k=1)
    return normalise_site_vector(votes) if unit == "site" else votes


def release(private_emb, private_labels, sigma, rng, mechanism_factory=GaussianMechanism, *, unit="image", n=1):
    """``n`` independent releases of one site's votes, shape (n, candidates).

    The mechanism adds iid noise of its input's shape, so one call on the tiled clean vector
    is ``n`` independent releases.
    """
    votes = clean_votes(private_emb, private_labels, unit)
    return mechanism_factory(sigma, SENSITIVITY).apply(np.tile(votes, (n, 1)), rng)


def central_site_sum(sites, sigma, rng, mechanism_factory=GaussianMechanism, *, n=1):
    """Central mode, site unit: the server noises the sum of the sites' normalised vectors once."""
    total = sum(clean_votes(emb, labels, "site") for emb, labels in sites)
    return mechanism_factory(sigma, SENSITIVITY).apply(np.tile(total, (n, 1)), rng)


# ---- the two audits --------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationResult:
    passed: bool
    std_ratio_min: float  # min / max over coordinates of sample std / claimed std
    std_ratio_max: float
    std_ok: bool
    mean_ok: bool


def noise_calibration_audit(outputs: np.ndarray, clean: np.ndarray, claimed_std: float, alpha: float) -> CalibrationResult:
    """Per coordinate: ``(n-1) s^2 / claimed_std^2`` within chi2(n-1) two-sided bounds, and the
    mean of ``outputs - clean`` within its normal CI; Bonferroni over coordinates and both tests."""
    noise = outputs - clean
    n, c = noise.shape
    a = alpha / (2 * c)  # per individual two-sided test
    var = noise.var(axis=0, ddof=1)
    stat = (n - 1) * var / claimed_std**2
    std_ok = bool(np.all((stat >= chi2.ppf(a / 2, n - 1)) & (stat <= chi2.isf(a / 2, n - 1))))
    mean_ok = bool(np.all(np.abs(noise.mean(axis=0)) <= norm.isf(a / 2) * claimed_std / math.sqrt(n)))
    ratio = np.sqrt(var) / claimed_std
    return CalibrationResult(std_ok and mean_ok, float(ratio.min()), float(ratio.max()), std_ok, mean_ok)


def _cp_upper(k: np.ndarray, n: int, a: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound (level 1 - a) of a binomial rate, k of n."""
    k = np.asarray(k, dtype=np.float64)
    return np.where(k >= n, 1.0, beta.ppf(1 - a, k + 1, np.maximum(n - k, 1)))


def empirical_epsilon_lower_bound(out_a, out_b, clean_a, clean_b, claimed_std, delta, alpha=EPSILON_ALPHA):
    """Audit lower bound on epsilon from releases on neighbouring inputs a and b.

    Outputs are projected on ``u = (clean_b - clean_a) / ||clean_b - clean_a||`` (centred so a's
    mean projects to 0, b's to ``||clean_b - clean_a||``). Thresholds are fixed in advance (a grid
    in units of the claimed std around the midpoint). For each threshold and both directions of
    the test, FPR and FNR get Clopper-Pearson upper bounds; with probability >= 1 - alpha all hold,
    hence eps >= log((1 - delta - FNR_up) / FPR_up) for every threshold simultaneously.
    """
    diff = clean_b - clean_a
    gap = float(np.linalg.norm(diff))
    u = diff / gap
    pa = np.sort((out_a - clean_a) @ u)
    pb = np.sort((out_b - clean_a) @ u)
    na, nb = pa.size, pb.size
    z = np.linspace(0.0, 5.0, N_THRESHOLDS)
    a = alpha / (2 * 2 * N_THRESHOLDS)  # two bounds per threshold, two directions
    bounds = []
    # Guess "b" when proj > t: false positive = a-sample above t, false negative = b-sample <= t.
    t = gap / 2 + claimed_std * z
    fp = na - np.searchsorted(pa, t, side="right")
    fn = np.searchsorted(pb, t, side="right")
    bounds.append((_cp_upper(fp, na, a), _cp_upper(fn, nb, a)))
    # Guess "a" when proj < t: false positive = b-sample below t, false negative = a-sample >= t.
    t = gap / 2 - claimed_std * z
    fp = np.searchsorted(pb, t, side="left")
    fn = na - np.searchsorted(pa, t, side="left")
    bounds.append((_cp_upper(fp, nb, a), _cp_upper(fn, na, a)))
    best = 0.0
    for fpr_up, fnr_up in bounds:
        num = 1.0 - delta - fnr_up
        ok = num > 0
        if ok.any():
            best = max(best, float(np.max(np.log(num[ok] / fpr_up[ok]))))
    return best


# ---- the neighbouring pairs, each released N times (cached across the parametrised tests) ----
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([7331, *key])


@lru_cache(maxsize=None)
def neighbour_releases(case: str, mech_name: str):
    """(outputs_a, outputs_b, clean_a, clean_b) for one adjacency case and one mechanism."""
    factory = MECHANISMS[mech_name]
    seed = (list(MECHANISMS).index(mech_name), ["image", "site-central", "site-local"].index(case))
    if case == "image":  # one private image added: D vs D'
        a_in, b_in, unit = (PRIVATE, PRIVATE_LABELS), (PRIVATE_PLUS, PRIVATE_PLUS_LABELS), "image"
    elif case == "site-local":
        # Local mode, site unit: the server sees this site's own release, so "site absent" means
        # it answers with no data (all-zero votes); the change is its normalised vector, norm <= 1.
        a_in, b_in, unit = EMPTY, (PRIVATE, PRIVATE_LABELS), "site"
    else:
        # Central mode, site unit: add/remove one whole site from the noised sum; its normalised
        # vector (norm <= 1) is the whole change, so sensitivity 1 (replacement would be sqrt 2).
        without, with_site = OTHER_SITES, [*OTHER_SITES, (PRIVATE, PRIVATE_LABELS)]
        out_a = central_site_sum(without, SIGMA, _rng(*seed, 0), factory, n=N_RELEASES)
        out_b = central_site_sum(with_site, SIGMA, _rng(*seed, 1), factory, n=N_RELEASES)
        clean_a = sum(clean_votes(e, lab, "site") for e, lab in without)
        clean_b = sum(clean_votes(e, lab, "site") for e, lab in with_site)
        return out_a, out_b, clean_a, clean_b
    out_a = release(*a_in, SIGMA, _rng(*seed, 0), factory, unit=unit, n=N_RELEASES)
    out_b = release(*b_in, SIGMA, _rng(*seed, 1), factory, unit=unit, n=N_RELEASES)
    return out_a, out_b, clean_votes(*a_in, unit), clean_votes(*b_in, unit)


CASES = ["image", "site-central", "site-local"]


def test_claim_and_neighbours_are_as_intended():
    """The claim is a one-release calibration, and each neighbouring pair differs by L2 norm 1."""
    assert epsilon_for_noise([SIGMA], DELTA) == pytest.approx(EPS_CLAIM, rel=1e-9)
    assert epsilon_for_noise([SIGMA / 2], DELTA) > 2 * EPS_CLAIM  # the broken one leaks far more
    assert np.linalg.norm(clean_votes(PRIVATE, PRIVATE_LABELS, "image")) > 1  # normalisation bites
    for case in CASES:
        _, _, clean_a, clean_b = neighbour_releases(case, "gaussian")
        assert np.linalg.norm(clean_b - clean_a) == pytest.approx(SENSITIVITY, abs=1e-9), case


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mech_name, expected_pass", AUDIT_CASES)
def test_noise_calibration_audit(case, mech_name, expected_pass, record_property):
    out_a, out_b, clean_a, clean_b = neighbour_releases(case, mech_name)
    results = [noise_calibration_audit(out, clean, CLAIMED_STD, CALIBRATION_ALPHA / 2)
               for out, clean in ((out_a, clean_a), (out_b, clean_b))]
    ratios = [(round(r.std_ratio_min, 4), round(r.std_ratio_max, 4)) for r in results]
    record_property("std_ratio_min_max", str(ratios))
    print(f"[{case}/{mech_name}] sample std / claimed std (min, max) per dataset: {ratios}")
    passed = all(r.passed for r in results)
    assert passed is expected_pass, f"{case}/{mech_name}: calibration {results}"
    if not expected_pass:
        assert not any(r.std_ok for r in results)  # detected through the std itself
        assert all(r.std_ratio_max < 0.55 for r in results)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mech_name, expected_pass", AUDIT_CASES)
def test_empirical_epsilon_audit(case, mech_name, expected_pass, record_property):
    out_a, out_b, clean_a, clean_b = neighbour_releases(case, mech_name)
    eps_lb = empirical_epsilon_lower_bound(out_a, out_b, clean_a, clean_b, CLAIMED_STD, DELTA)
    record_property("eps_lb", eps_lb)
    record_property("eps_claim", EPS_CLAIM)
    print(f"[{case}/{mech_name}] empirical eps lower bound {eps_lb:.3f} vs claimed {EPS_CLAIM}")
    msg = f"{case}/{mech_name}: eps_lb={eps_lb:.3f}, eps_claim={EPS_CLAIM}"
    assert (eps_lb <= EPS_CLAIM) is expected_pass, msg
    if expected_pass:
        # The audit has real power on the correct mechanism too (it is not vacuous).
        assert eps_lb > 0.5 * EPS_CLAIM, msg
    else:
        assert eps_lb > EPS_CLAIM + 0.4, msg  # detected with margin, not by luck


# ---- the audited path is the one Site.vote takes --------------------------------------------
@pytest.mark.parametrize("unit", ["image", "site"])
def test_site_vote_uses_the_audited_release(unit, tmp_path, monkeypatch):
    """Site.vote (local mode) noises exactly ``clean_votes`` with GaussianMechanism(sigma, 1)."""
    import clients.site as site_module  # imports torch (embedder): only here

    calls = []

    class Recording(GaussianMechanism):
        def apply(self, values, rng):
            out = super().apply(values, rng)
            calls.append((self.noise_multiplier, self.sensitivity, np.array(values), out))
            return out

    monkeypatch.setattr(site_module, "GaussianMechanism", Recording)
    site = site_module.Site.__new__(site_module.Site)  # no data loading / embedder: stub state
    site.embeddings = PRIVATE
    site.data = SimpleNamespace(train=SimpleNamespace(labels=PRIVATE_LABELS))
    site.trusts_server = True
    site.ledger = PrivacyLedger(tmp_path / "ledger.json", 10.0, DELTA)
    request = {"privacy-mode": "local", "privacy-unit": unit, "rater": "PE", "k": 1,
               "noise-multiplier": SIGMA, "round": 1, "run-id": "audit"}
    result = site.vote(CANDIDATES, CANDIDATE_LABELS, request)
    assert len(calls) == 1
    sigma, sensitivity, noised_input, out = calls[0]
    assert (sigma, sensitivity) == (SIGMA, SENSITIVITY)
    np.testing.assert_array_equal(noised_input, clean_votes(PRIVATE, PRIVATE_LABELS, unit))
    np.testing.assert_array_equal(result.votes, out)
    assert result.epsilon_spent == pytest.approx(EPS_CLAIM, rel=1e-6)
    # Central mode: the clean vector sent to the trusted server is the same one.
    central = site.vote(CANDIDATES, CANDIDATE_LABELS, {**request, "privacy-mode": "central", "round": 2})
    np.testing.assert_array_equal(central.votes, clean_votes(PRIVATE, PRIVATE_LABELS, unit))
