"""Differential privacy for vote histograms: accounting, the Gaussian mechanism, site ledgers.

Importing this package does not import torch/opacus; only :class:`OpacusAccountant` does.
"""

from .accountant import (
    ACCOUNTANT_NAMES,
    RELEASE_KINDS,
    Accountant,
    GaussianAccountant,
    OpacusAccountant,
    PrivacyError,
    PrivacyWarning,
    delta_for_mu,
    epsilon_for_mu,
    epsilon_for_noise,
    epsilon_for_releases,
    gdp_mu,
    make_accountant,
    mu_for_epsilon,
    noise_multiplier_for_epsilon,
    validate_epsilon_delta,
)
from .discrete_gaussian import discrete_gaussian
from .distributed import (
    check_modulus,
    clip_probability,
    ddg_epsilon,
    ddg_noise_multiplier,
    noise_for_epsilon_secagg,
    secagg_bound,
    share_variance,
    wrap_free,
)
from .ledger import BudgetExceededError, LedgerCorruptError, LedgerEntry, PrivacyLedger
from .mechanism import NOISE_MODES, GaussianMechanism, aggregate_noise_std

__all__ = [
    "ACCOUNTANT_NAMES",
    "NOISE_MODES",
    "RELEASE_KINDS",
    "Accountant",
    "BudgetExceededError",
    "GaussianAccountant",
    "GaussianMechanism",
    "LedgerCorruptError",
    "LedgerEntry",
    "OpacusAccountant",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacyWarning",
    "aggregate_noise_std",
    "check_modulus",
    "clip_probability",
    "ddg_epsilon",
    "ddg_noise_multiplier",
    "delta_for_mu",
    "discrete_gaussian",
    "epsilon_for_mu",
    "epsilon_for_noise",
    "epsilon_for_releases",
    "gdp_mu",
    "make_accountant",
    "mu_for_epsilon",
    "noise_for_epsilon_secagg",
    "noise_multiplier_for_epsilon",
    "secagg_bound",
    "share_variance",
    "validate_epsilon_delta",
    "wrap_free",
]
